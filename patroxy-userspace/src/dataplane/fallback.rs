//! The userspace data path: the same session semantics as `sockmap`, with the bytes copied by
//! tokio (used when BPF is off or unavailable, and for a pair the sockmap could not take).
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, sleep_until},
};

use super::{EndReason, KillSwitch, SessionEnd, SessionMeta, Side, reset_both, sockopt};

pub(super) async fn run(
    client: TcpStream,
    backend: TcpStream,
    meta: SessionMeta,
    kill: &KillSwitch,
) -> SessionEnd {
    let activity = Arc::new(Activity::default());
    let mut c = Counted::new(client, activity.clone(), Side::Client);
    let mut b = Counted::new(backend, activity.clone(), Side::Server);
    let outcome = {
        let copy = tokio::io::copy_bidirectional(&mut c, &mut b);
        tokio::pin!(copy);
        loop {
            let deadline = activity.idle_deadline(meta.idle_timeout);
            tokio::select! {
                r = &mut copy => break Outcome::Copied(r),
                reason = kill.killed() => break Outcome::Reason(EndReason::Killed(reason)),
                _ = sleep_until(deadline) => {
                    if activity.idle_deadline(meta.idle_timeout) <= Instant::now() {
                        break Outcome::Reason(EndReason::Timeout);
                    }
                }
            }
        }
    };
    let reason = match outcome {
        Outcome::Copied(Ok(_)) => match activity.first_eof() {
            Some(Side::Server) => EndReason::ServerClose,
            _ => EndReason::ClientClose,
        },
        // copy_bidirectional does not say which side failed; `Counted` noted it.
        Outcome::Copied(Err(e)) => match activity.first_error() {
            Some(side) if is_reset(&e) => side.reset_reason(),
            _ => EndReason::Error(e.to_string()),
        },
        Outcome::Reason(r) => r,
    };
    let end = SessionEnd {
        reason,
        bytes_from_client: activity.from_client.load(Ordering::Relaxed),
        bytes_from_server: activity.from_server.load(Ordering::Relaxed),
    };
    match &end.reason {
        EndReason::ClientClose | EndReason::ServerClose | EndReason::Timeout => {}
        _ => reset_both(c.inner, b.inner),
    }
    end
}

enum Outcome {
    Copied(io::Result<(u64, u64)>),
    Reason(EndReason),
}

/// Byte counts and last activity of one session (the fallback's equivalent of SESSIONS).
#[derive(Default)]
struct Activity {
    from_client: AtomicU64,
    from_server: AtomicU64,
    last_ns: AtomicU64,
    /// 1 = client sent EOF first, 2 = server did.
    first_eof: AtomicU64,
    /// 1 = an I/O error happened first on the client socket, 2 = on the server socket.
    first_error: AtomicU64,
}

impl Activity {
    fn record(&self, side: Side, n: usize) {
        let counter = match side {
            Side::Client => &self.from_client,
            Side::Server => &self.from_server,
        };
        if n == 0 {
            let _ = self.first_eof.compare_exchange(
                0,
                code_of(side),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.last_ns
            .store(sockopt::monotonic_ns(), Ordering::Relaxed);
    }

    fn first_eof(&self) -> Option<Side> {
        side_of(self.first_eof.load(Ordering::Relaxed))
    }

    fn record_error(&self, side: Side) {
        let _ = self.first_error.compare_exchange(
            0,
            code_of(side),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn first_error(&self) -> Option<Side> {
        side_of(self.first_error.load(Ordering::Relaxed))
    }

    fn idle_deadline(&self, idle: Duration) -> Instant {
        let last = self.last_ns.load(Ordering::Relaxed);
        let last = if last == 0 {
            sockopt::monotonic_ns()
        } else {
            last
        };
        let idle_for = Duration::from_nanos(sockopt::monotonic_ns().saturating_sub(last));
        Instant::now() + idle.saturating_sub(idle_for)
    }
}

fn code_of(side: Side) -> u64 {
    match side {
        Side::Client => 1,
        Side::Server => 2,
    }
}

fn side_of(code: u64) -> Option<Side> {
    match code {
        1 => Some(Side::Client),
        2 => Some(Side::Server),
        _ => None,
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A stream that records the bytes read from it in `Activity`.
struct Counted {
    inner: TcpStream,
    activity: Arc<Activity>,
    side: Side,
}

impl Counted {
    fn new(inner: TcpStream, activity: Arc<Activity>, side: Side) -> Self {
        activity
            .last_ns
            .store(sockopt::monotonic_ns(), Ordering::Relaxed);
        Self {
            inner,
            activity,
            side,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                self.activity.record(self.side, n);
            }
            Poll::Ready(Err(_)) => self.activity.record_error(self.side),
            Poll::Pending => {}
        }
        res
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &res {
            self.activity.record_error(self.side);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
