//! One session spliced in the kernel: insert the pair, wake it, watch both ends, tear down.
//!
//! Userspace never reads or writes these sockets once they are in SOCKS: the verdict program
//! forwards every byte. What userspace still does is what the kernel does not: propagate FIN
//! (the verdict drops bare FIN skbs; TCP has recorded the FIN) once the bytes before it were
//! delivered, propagate RST, expire idle sessions and reset on demand. With `datapath = "tc"`
//! it also hands the session to the packet-level splice once it is quiet, or behind a short
//! fence if it stays busy (`tc::schedule`, `tc::handoff`).
use std::{
    net::TcpStream as StdTcpStream,
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use patroxy_common::{SIDE_BACKEND, SIDE_CLIENT, SessionEntry};
use tokio::{
    net::TcpStream,
    time::{Instant, sleep, sleep_until},
};

use super::{
    Detached, EndReason, KernelMaps, KillSwitch, Outcome, SessionEnd, SessionMeta, Side,
    closewatch::{CloseWatcher, Watch},
    reset_both,
    sockopt::{self, TcpCounters},
    tc::{self, TcPath},
};

/// How the sockmap part of a session ended.
enum Watched {
    Ended(EndReason),
    /// The TC program carries the session now.
    HandedOff(tc::Flow),
    /// A successor takes the session over (never in the middle of a hand-off attempt, whose
    /// fence and repair-mode sockets must not be left behind).
    HandingOver,
}

/// A pair inserted in SOCKS/SESSIONS; removes its entries when dropped, unless handed over.
pub(super) struct Spliced {
    maps: Arc<KernelMaps>,
    client_cookie: u64,
    backend_cookie: u64,
    meta: SessionMeta,
    /// Set when the pair goes to a successor: its entries stay for it.
    keep_entries: bool,
    /// The packet-level splice to hand the session to, and what the sockets carried before
    /// the sockmap took them.
    tc: Option<(Arc<TcPath>, tc::Baseline)>,
}

impl Spliced {
    /// Inserts backend then client (PostgreSQL servers never speak first, so no backend byte can
    /// meet a missing peer), then wakes both so bytes that arrived earlier are forwarded.
    pub(super) fn insert(
        maps: &Arc<KernelMaps>,
        tc: Option<Arc<TcPath>>,
        client: &TcpStream,
        backend: &TcpStream,
        meta: SessionMeta,
    ) -> std::io::Result<Self> {
        let client_cookie = sockopt::cookie(client)?;
        let backend_cookie = sockopt::cookie(backend)?;
        let spliced = Self {
            maps: maps.clone(),
            client_cookie,
            backend_cookie,
            meta,
            keep_entries: false,
            tc: tc.map(|tc| (tc, tc::Baseline::read(client, backend))),
        };
        let now = sockopt::monotonic_ns();
        let entry = |peer, side| SessionEntry {
            peer,
            last_ns: now,
            backend: meta.backend_id,
            listener: meta.listener,
            side,
            ..Default::default()
        };
        {
            let mut sessions = maps.sessions.lock().expect("sessions lock");
            sessions
                .insert(client_cookie, entry(backend_cookie, SIDE_CLIENT), 0)
                .map_err(map_err)?;
            sessions
                .insert(backend_cookie, entry(client_cookie, SIDE_BACKEND), 0)
                .map_err(map_err)?;
        }
        {
            let mut socks = maps.socks.lock().expect("socks lock");
            socks
                .insert(backend_cookie, backend.as_raw_fd(), 0)
                .map_err(map_err)?;
            socks
                .insert(client_cookie, client.as_raw_fd(), 0)
                .map_err(map_err)?;
        }
        sockopt::kick(client)?;
        sockopt::kick(backend)?;
        Ok(spliced)
    }

    /// A pair a predecessor inserted: its entries are in the maps already (the verdict program
    /// has been forwarding its bytes all along, or the TC program since a hand-off), so only
    /// the watch starts again ([`Spliced::watch_resumed`]). `baseline`: what the predecessor
    /// wrote to each socket before the splice.
    pub(super) fn resume(
        maps: &Arc<KernelMaps>,
        tc: Option<Arc<TcPath>>,
        client: &StdTcpStream,
        backend: &StdTcpStream,
        meta: SessionMeta,
        baseline: tc::Baseline,
    ) -> std::io::Result<Self> {
        let spliced = Self {
            maps: maps.clone(),
            client_cookie: sockopt::cookie(client)?,
            backend_cookie: sockopt::cookie(backend)?,
            meta,
            keep_entries: false,
            tc: tc.map(|tc| (tc, baseline)),
        };
        let sessions = maps.sessions.lock().expect("sessions lock");
        if sessions.get(&spliced.client_cookie, 0).is_err()
            || sessions.get(&spliced.backend_cookie, 0).is_err()
        {
            return Err(std::io::Error::other("the pair is not in SESSIONS"));
        }
        drop(sessions);
        Ok(spliced)
    }

    pub(super) async fn run(
        self,
        client: TcpStream,
        backend: TcpStream,
        closes: &Arc<CloseWatcher>,
        kill: &KillSwitch,
    ) -> Outcome {
        // Leave tokio's reactor: it would be woken for every spliced message. The close
        // watcher reports only FIN, RST and HUP.
        let (client, backend) = match (client.into_std(), backend.into_std()) {
            (Ok(c), Ok(b)) => (c, b),
            _ => {
                return Outcome::Ended(
                    self.end(EndReason::Error("leaving the reactor failed".into())),
                );
            }
        };
        self.watch_std(client, backend, closes, kill).await
    }

    /// Goes on with a session a predecessor passed: with the TC program if it carries it,
    /// else on the sockmap (from where it may be handed off here).
    pub(super) async fn watch_resumed(
        self,
        client: StdTcpStream,
        backend: StdTcpStream,
        closes: &Arc<CloseWatcher>,
        kill: &KillSwitch,
    ) -> Outcome {
        let carried = self
            .tc
            .as_ref()
            .and_then(|(tc, _)| tc::carried_flow(tc, &client, &backend));
        match carried {
            Some(flow) => self.run_flow(flow, client, backend, kill).await,
            None => self.watch_std(client, backend, closes, kill).await,
        }
    }

    pub(super) async fn watch_std(
        self,
        client: StdTcpStream,
        backend: StdTcpStream,
        closes: &Arc<CloseWatcher>,
        kill: &KillSwitch,
    ) -> Outcome {
        let watched = match (closes.watch(&client), closes.watch(&backend)) {
            (Ok(cw), Ok(bw)) => self.watch(&client, &backend, &cw, &bw, kill).await,
            (Err(e), _) | (_, Err(e)) => {
                Watched::Ended(EndReason::Error(format!("watching for close: {e}")))
            }
        };
        let reason = match watched {
            Watched::HandingOver => return self.hand_over(client, backend),
            Watched::Ended(reason) => reason,
            Watched::HandedOff(flow) => return self.run_flow(flow, client, backend, kill).await,
        };
        match &reason {
            EndReason::Killed(_) | EndReason::ClientReset | EndReason::ServerReset => {
                reset_both(client, backend)
            }
            _ => drop((client, backend)),
        }
        Outcome::Ended(self.end(reason))
    }

    /// Watches a session the TC program carries until it ends or a successor takes it over.
    async fn run_flow(
        self,
        flow: tc::Flow,
        client: StdTcpStream,
        backend: StdTcpStream,
        kill: &KillSwitch,
    ) -> Outcome {
        let (spliced, _) = self.tc.clone().expect("a flow without a TC path");
        let carried = &spliced.counters.carried;
        carried.fetch_add(1, Ordering::Relaxed);
        let outcome = flow
            .run(&spliced, client, backend, self.meta.idle_timeout, kill)
            .await;
        carried.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            tc::FlowOutcome::Ended(flow) => {
                let (from_client, from_server) = self.counters();
                Outcome::Ended(SessionEnd {
                    reason: flow.reason,
                    bytes_from_client: from_client + flow.bytes_from_client,
                    bytes_from_server: from_server + flow.bytes_from_server,
                    handed_off_to_tc: true,
                })
            }
            tc::FlowOutcome::HandedOver(client, backend) => self.hand_over(client, backend),
        }
    }

    /// The pair goes to a successor: its entries stay in the maps for it.
    fn hand_over(mut self, client: StdTcpStream, backend: StdTcpStream) -> Outcome {
        self.keep_entries = true;
        Outcome::HandedOver(Detached {
            client,
            backend,
            baseline: self.tc.as_ref().map(|(_, b)| *b).unwrap_or_default(),
        })
    }

    fn end(&self, reason: EndReason) -> SessionEnd {
        let (bytes_from_client, bytes_from_server) = self.counters();
        SessionEnd {
            reason,
            bytes_from_client,
            bytes_from_server,
            handed_off_to_tc: false,
        }
    }

    async fn watch(
        &self,
        client: &StdTcpStream,
        backend: &StdTcpStream,
        client_closes: &Watch,
        backend_closes: &Watch,
        kill: &KillSwitch,
    ) -> Watched {
        let mut client_open = true;
        let mut backend_open = true;
        let mut first_close = None;
        // `insert` just stamped both entries with the current time: no need to read them back.
        let mut idle_deadline = Instant::now() + self.meta.idle_timeout;
        let mut hand_off = self.tc.as_ref().map(|_| tc::Schedule::new(Instant::now()));
        loop {
            if !client_open && !backend_open {
                return Watched::Ended(first_close.unwrap_or(EndReason::ClientClose));
            }
            let hand_off_due = async {
                match &hand_off {
                    Some(schedule) if client_open && backend_open => {
                        sleep_until(schedule.due()).await;
                    }
                    _ => std::future::pending().await,
                }
            };
            let (side, events) = tokio::select! {
                e = client_closes.next(), if client_open => (Side::Client, e),
                e = backend_closes.next(), if backend_open => (Side::Server, e),
                reason = kill.killed() => return Watched::Ended(EndReason::Killed(reason)),
                // Between hand-off attempts only: an attempt (below) runs to its end first.
                () = kill.handing_over() => return Watched::HandingOver,
                _ = sleep_until(idle_deadline) => {
                    idle_deadline = self.idle_deadline();
                    if idle_deadline <= Instant::now() {
                        return Watched::Ended(EndReason::Timeout);
                    }
                    continue;
                }
                () = hand_off_due => {
                    let (spliced, baseline) = self.tc.as_ref().expect("hand-off timer without TC");
                    let schedule = hand_off.as_mut().expect("hand-off timer without a schedule");
                    let mode = schedule.mode(Instant::now());
                    // A fenced attempt holds the session's data for 150 ms (up to 1 s while its
                    // sockets drain), and a kill or a successor ends it early: a close seen after
                    // it is not late by more.
                    let interrupted = async {
                        tokio::select! {
                            _ = kill.killed() => {}
                            () = kill.handing_over() => {}
                        }
                    };
                    match tc::try_hand_off(
                        spliced,
                        &self.maps,
                        client,
                        backend,
                        (self.client_cookie, self.backend_cookie),
                        *baseline,
                        self.meta.backend_id,
                        mode,
                        interrupted,
                    )
                    .await
                    {
                        tc::Attempt::HandedOff(flow) => return Watched::HandedOff(flow),
                        tc::Attempt::NotNow => schedule.failed(mode, Instant::now()),
                        tc::Attempt::Never => hand_off = None,
                    }
                    continue;
                }
            };
            let (this, peer) = match side {
                Side::Client => (client, backend),
                Side::Server => (backend, client),
            };
            let event = classify(this, events);
            tracing::debug!(?side, ?event, "sockmap session event");
            match event {
                Event::Reset => return Watched::Ended(side.reset_reason()),
                Event::Spurious => continue,
                Event::Fin => {
                    let delivered = tokio::select! {
                        r = self.deliver_then_shutdown(this, peer, side.peer()) => r,
                        reason = kill.killed() => Err(EndReason::Killed(reason)),
                        // The successor sees the FIN again and delivers it.
                        () = kill.handing_over() => return Watched::HandingOver,
                    };
                    if let Err(reason) = delivered {
                        return Watched::Ended(reason);
                    }
                    first_close.get_or_insert(side.close_reason());
                    match side {
                        Side::Client => client_open = false,
                        Side::Server => backend_open = false,
                    }
                }
            }
        }
    }

    /// Sends FIN on `peer` only once every byte that arrived on `from` has been handed to `peer`'s
    /// TCP send queue; a shutdown before that would cut off bytes still in the sockmap's queue.
    async fn deliver_then_shutdown(
        &self,
        from: &StdTcpStream,
        peer: &StdTcpStream,
        peer_side: Side,
    ) -> Result<(), EndReason> {
        let deadline = Instant::now() + self.meta.idle_timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            // A hard error in the peer's psock (it reports it as the peer's socket error) stops
            // all forwarding to the peer: the bytes will never arrive, so waiting would only
            // stall the session until the idle timeout and then end it with a clean-looking
            // FIN. The watch loop no longer watches a side after its FIN, so look here.
            if matches!(peer.take_error(), Ok(Some(_)) | Err(_)) {
                return Err(peer_side.reset_reason());
            }
            let (Ok(src), Ok(dst)) = (sockopt::tcp_counters(from), sockopt::tcp_counters(peer))
            else {
                return Err(EndReason::Error("TCP_INFO failed".into()));
            };
            if delivered(&src, &dst) {
                break;
            }
            tracing::debug!(?src, ?dst, "waiting for delivery before FIN");
            if peer_gone(&dst) {
                return Err(EndReason::Error(
                    "peer closed before the data was delivered".into(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(EndReason::Timeout);
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        sockopt::shutdown_write(peer).map_err(|e| EndReason::Error(format!("shutdown: {e}")))
    }

    /// The instant at which the session is idle for `idle_timeout`, by the kernel's last activity.
    fn idle_deadline(&self) -> Instant {
        let last_ns = {
            let sessions = self.maps.sessions.lock().expect("sessions lock");
            [self.client_cookie, self.backend_cookie]
                .iter()
                .filter_map(|c| sessions.get(c, 0).ok())
                .map(|e| e.last_ns)
                .max()
                .unwrap_or(0)
        };
        let idle_for = Duration::from_nanos(sockopt::monotonic_ns().saturating_sub(last_ns));
        Instant::now() + self.meta.idle_timeout.saturating_sub(idle_for)
    }

    /// (bytes from the client, bytes from the server), as the verdict program counted them.
    fn counters(&self) -> (u64, u64) {
        let sessions = self.maps.sessions.lock().expect("sessions lock");
        let rx = |c| sessions.get(c, 0).map(|e| e.bytes_rx).unwrap_or(0);
        (rx(&self.client_cookie), rx(&self.backend_cookie))
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if self.keep_entries {
            return;
        }
        // Closing a socket removes it from SOCKS too; removing first keeps the map exact even
        // while the fds are still open.
        if let Ok(mut socks) = self.maps.socks.lock() {
            let _ = socks.remove(&self.client_cookie);
            let _ = socks.remove(&self.backend_cookie);
        }
        if let Ok(mut sessions) = self.maps.sessions.lock() {
            let _ = sessions.remove(&self.client_cookie);
            let _ = sessions.remove(&self.backend_cookie);
        }
    }
}

#[derive(Debug)]
enum Event {
    Fin,
    Reset,
    /// An event with neither FIN nor error (not expected with the bits we watch).
    Spurious,
}

fn classify(stream: &StdTcpStream, events: u32) -> Event {
    let error = events & libc::EPOLLERR as u32 != 0;
    if error || matches!(stream.take_error(), Ok(Some(_)) | Err(_)) {
        return Event::Reset;
    }
    if events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
        return Event::Fin;
    }
    Event::Spurious
}

/// Called once `from` has received its FIN, which TCP counts as one byte of `bytes_received`.
fn delivered(from: &TcpCounters, to: &TcpCounters) -> bool {
    to.bytes_written + 1 >= from.bytes_received
}

fn peer_gone(c: &TcpCounters) -> bool {
    // include/net/tcp_states.h: TCP_ESTABLISHED = 1, TCP_CLOSE_WAIT = 8.
    !matches!(c.state, 1 | 8)
}

fn map_err(e: aya::maps::MapError) -> std::io::Error {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    }
}
