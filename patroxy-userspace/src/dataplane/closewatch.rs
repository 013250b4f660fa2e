//! Watches spliced sockets for the only events userspace still cares about: FIN, RST, HUP.
//!
//! A socket in the sockmap wakes its epoll waiters on every message it forwards (the psock's
//! data_ready ends in sock_def_readable). tokio registers sockets for EPOLLIN, so each message
//! would wake the proxy for nothing. This watcher owns one epoll set where spliced sockets are
//! registered for EPOLLRDHUP | EPOLLERR | EPOLLHUP only: the kernel filters the per-message
//! EPOLLIN wakeups out, and userspace runs once per close, not once per message.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use tokio::{io::unix::AsyncFd, sync::Notify};

const WATCHED: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLET) as u32;

pub struct CloseWatcher {
    epoll: AsyncFd<OwnedFd>,
    next_token: AtomicU64,
    waiters: Mutex<HashMap<u64, Arc<Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    notify: Notify,
    /// epoll events seen since the last `next()`.
    events: AtomicU32,
}

/// One registered socket; deregisters when dropped.
pub struct Watch {
    watcher: Arc<CloseWatcher>,
    token: u64,
    fd: RawFd,
    waiter: Arc<Waiter>,
}

impl CloseWatcher {
    pub fn new() -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let watcher = Arc::new(Self {
            // An epoll fd is readable when it has events.
            // SAFETY: the AsyncFd owns the fd and nothing else closes or replaces it.
            epoll: unsafe { AsyncFd::register(owned)? },
            next_token: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
        });
        tokio::spawn(dispatch(watcher.clone()));
        Ok(watcher)
    }

    /// Starts watching `socket`; events that already hold are reported at once.
    pub fn watch(self: &Arc<Self>, socket: &impl AsRawFd) -> io::Result<Watch> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter::default());
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(token, waiter.clone());
        let mut event = libc::epoll_event {
            events: WATCHED,
            u64: token,
        };
        let fd = socket.as_raw_fd();
        // SAFETY: valid epoll fd, socket fd and event.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 {
            self.waiters.lock().expect("waiters lock").remove(&token);
            return Err(io::Error::last_os_error());
        }
        Ok(Watch {
            watcher: self.clone(),
            token,
            fd,
            waiter,
        })
    }

    /// Moves ready events to their waiters; returns false once nothing is pending.
    fn drain(&self) -> io::Result<bool> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: the buffer holds 64 events.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 64, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let waiters = self.waiters.lock().expect("waiters lock");
        for e in &events[..n as usize] {
            let (token, bits) = (e.u64, e.events);
            if let Some(w) = waiters.get(&token) {
                w.events.fetch_or(bits, Ordering::Relaxed);
                w.notify.notify_one();
            }
        }
        Ok(n as usize == events.len())
    }
}

/// Runs for the daemon's life: wakes when the epoll set has events and hands them out.
async fn dispatch(w: Arc<CloseWatcher>) {
    loop {
        let mut guard = match w.epoll.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        loop {
            match w.drain() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return,
            }
        }
        guard.clear_ready();
    }
}

impl Watch {
    /// Waits for the next close-related event and returns the epoll bits (EPOLLRDHUP, ...).
    pub async fn next(&self) -> u32 {
        loop {
            let bits = self.waiter.events.swap(0, Ordering::Relaxed);
            if bits != 0 {
                return bits;
            }
            self.waiter.notify.notified().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: removing a registration; the fd is still open (the session owns it).
        unsafe {
            libc::epoll_ctl(
                self.watcher.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.fd,
                std::ptr::null_mut(),
            )
        };
        self.watcher
            .waiters
            .lock()
            .expect("waiters lock")
            .remove(&self.token);
    }
}
