//! The userspace data path: the same session semantics as `sockmap` (used when BPF is off or
//! unavailable, and for a pair the sockmap could not take). Driven by tokio's readiness, each
//! direction reads a small message through a stack buffer and writes it straight on; larger
//! transfers go socket -> pipe -> socket by splice(2), one pipe per direction, without a copy to
//! userspace. No userspace buffer lives with a session (idle RSS ~3 KiB per session instead of
//! copy_bidirectional's 2 x 8 KiB); when no pipe can be had (fd limit), tokio copies instead.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
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
    let pipes = Pipe::new().and_then(|up| Ok((up, Pipe::new()?))).ok();
    let outcome = {
        let copy = async {
            match &pipes {
                Some((up, down)) => {
                    let (c, b, a) = (&c.inner, &b.inner, &activity);
                    tokio::try_join!(
                        pump(c, b, up, Side::Client, a),
                        pump(b, c, down, Side::Server, a)
                    )
                }
                None => tokio::io::copy_bidirectional(&mut c, &mut b).await,
            }
        };
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
    drop(pipes);
    let reason = match outcome {
        Outcome::Copied(Ok(_)) => match activity.first_eof() {
            Some(Side::Server) => EndReason::ServerClose,
            _ => EndReason::ClientClose,
        },
        // Neither path says which side failed; `pump` and `Counted` noted it.
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
        handed_off_to_tc: false,
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

/// One direction's kernel buffer: splice(2) moves socket pages in and out of it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Bytes moved per splice: the default pipe capacity (16 pages).
const CHUNK: usize = 64 * 1024;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned only here.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds the caller keeps open; no offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Bytes a first read copies through the stack: a PostgreSQL request or reply usually fits, and
/// read+write costs less than splicing it (splice gives each small skb a page of its own).
const SMALL: usize = 2048;

/// Moves bytes from `src` to `dst` until `src` reaches EOF, then half-closes `dst` (after the
/// bytes before the EOF, like copy_bidirectional). Each round reads up to `SMALL` bytes and
/// writes them straight on; what `dst` does not take waits in `pipe`, and a full read means
/// more is queued, which goes socket -> pipe -> socket by splice. The pipe is empty whenever a
/// round starts, so writes into it never block and a blocked splice into it means `src` has
/// nothing to read.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    from: Side,
    activity: &Activity,
) -> io::Result<u64> {
    let to = match from {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    };
    let failed = |side, e| {
        activity.record_error(side);
        e
    };
    let mut total = 0u64;
    loop {
        let (n, mut queued) = loop {
            src.readable().await.map_err(|e| failed(from, e))?;
            match src.try_io(Interest::READABLE, || small_round(src, dst, pipe)) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(failed(from, e)),
            }
        };
        activity.record(from, n);
        if n == 0 {
            sockopt::shutdown_write(dst)?;
            return Ok(total);
        }
        total += n as u64;
        if n == SMALL && queued == 0 {
            // More is probably waiting: splice it (WouldBlock here just means it was not).
            match splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK) {
                Ok(m) => {
                    activity.record(from, m);
                    if m == 0 {
                        sockopt::shutdown_write(dst)?;
                        return Ok(total);
                    }
                    total += m as u64;
                    queued = m;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(failed(from, e)),
            }
        }
        while queued > 0 {
            dst.writable().await.map_err(|e| failed(to, e))?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), queued)
            }) {
                Ok(m) => queued -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(failed(to, e)),
            }
        }
    }
}

/// Reads up to `SMALL` bytes from `src` and writes them to `dst`; what `dst` does not take now
/// goes into the (empty) pipe. Returns (bytes read, bytes left in the pipe); WouldBlock means
/// `src` had nothing. A failed write leaves the bytes in the pipe for the splice loop, which
/// reports the error.
fn small_round(src: &TcpStream, dst: &TcpStream, pipe: &Pipe) -> io::Result<(usize, usize)> {
    let mut buf = [0u8; SMALL];
    // SAFETY: reading into a stack buffer of SMALL bytes.
    let n = unsafe { libc::read(src.as_raw_fd(), buf.as_mut_ptr().cast(), SMALL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n == 0 {
        return Ok((0, 0));
    }
    // SAFETY: writing n initialized bytes; MSG_NOSIGNAL: a reset peer gives EPIPE, not SIGPIPE.
    let w = unsafe {
        libc::send(
            dst.as_raw_fd(),
            buf.as_ptr().cast(),
            n,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    let written = if w < 0 { 0 } else { w as usize };
    if written < n {
        // SAFETY: the pipe is empty and holds CHUNK > SMALL bytes: this write takes everything.
        let p = unsafe {
            libc::write(
                pipe.write.as_raw_fd(),
                buf[written..n].as_ptr().cast(),
                n - written,
            )
        };
        if p != (n - written) as isize {
            return Err(io::Error::other("pipe took less than it holds"));
        }
    }
    Ok((n, n - written))
}
