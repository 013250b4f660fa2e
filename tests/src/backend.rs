//! In-process TCP backends for data-path tests: each records what it saw so a test can assert
//! byte-exact delivery, FIN and RST propagation from the server's side.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

/// How a backend connection ended, seen from the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The peer sent FIN after `bytes` bytes whose FNV-1a hash is `hash`.
    Eof {
        bytes: u64,
        hash: u64,
    },
    /// The peer reset the connection after `bytes` bytes.
    Reset {
        bytes: u64,
    },
    Error(String),
}

#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Echo everything; FIN after the client's FIN.
    Echo,
    /// Read an 8-byte big-endian N, send N pattern bytes and FIN first, then read the client's
    /// bytes to EOF.
    ServerClosesFirst,
    /// Read `after` bytes, then close with RST.
    ResetAfter { after: u64 },
    /// Accept and hold the connection open without reading until the client leaves.
    Hold,
    /// Read the first bytes, then never again: what is sent next fills the socket buffers and
    /// stays there (a stuck server), held open until the test ends. A connection that ends
    /// before sending anything (a readiness probe) is closed.
    Stall,
}

/// A listening backend running on the current tokio runtime.
pub struct Backend {
    pub addr: SocketAddr,
    endings: Arc<Mutex<Vec<Ending>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<OpenCount>,
}

/// Connections open at once: now and the most so far. An echo connection counts until it reads
/// the client's FIN, before it answers with its own: a proxy that frees the session's place only
/// once both sides closed can never have the next one counted while this one still is.
#[derive(Default)]
struct OpenCount {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// Counts one open connection until dropped.
struct Open(Arc<OpenCount>);

impl Open {
    fn new(count: &Arc<OpenCount>) -> Open {
        let now = count.now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        count
            .most
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Backend {
    pub async fn start(behaviour: Behaviour) -> Backend {
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        Self::serve_on(addr, async { listener }, behaviour)
    }

    /// Like [`Backend::start`], but nothing listens on its address until [`Opener::open`]:
    /// connects are refused until then, as while a server restarts.
    pub async fn start_closed(behaviour: Behaviour) -> (Backend, Opener) {
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::ports::free_tcp_port()));
        let (open, opened) = tokio::sync::oneshot::channel();
        let listener = async move {
            let _ = opened.await;
            listen(addr)
        };
        (Self::serve_on(addr, listener, behaviour), Opener(open))
    }

    fn serve_on(
        addr: SocketAddr,
        listener: impl Future<Output = TcpListener> + Send + 'static,
        behaviour: Behaviour,
    ) -> Backend {
        let endings = Arc::new(Mutex::new(Vec::new()));
        let e = endings.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let open = Arc::new(OpenCount::default());
        let opened = open.clone();
        tokio::spawn(async move {
            let listener = listener.await;
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (e, open) = (e.clone(), Open::new(&opened));
                tokio::spawn(async move {
                    let ending = serve(stream, behaviour, open).await;
                    e.lock().unwrap().push(ending);
                });
            }
        });
        Backend {
            addr,
            endings,
            accepted,
            open,
        }
    }

    /// The most connections that were open at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.open.most.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn endings(&self) -> Vec<Ending> {
        self.endings.lock().unwrap().clone()
    }

    /// Waits until the endings so far satisfy `done` (or `timeout`), returning them.
    pub async fn wait_for(
        &self,
        done: impl Fn(&[Ending]) -> bool,
        timeout: Duration,
    ) -> Vec<Ending> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.endings()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.endings()
    }
}

/// Starts the listening of a [`Backend::start_closed`] backend.
pub struct Opener(tokio::sync::oneshot::Sender<()>);

impl Opener {
    pub fn open(self) {
        let _ = self.0.send(());
    }
}

/// A listener with a backlog for hundreds of simultaneous connects (`TcpListener::bind` takes
/// 128): an overflow drops the SYN, and patroxy's connect waits for the retransmit, a second or
/// more, a delay the tests do not mean to add.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("backend socket");
    socket.bind(addr).expect("bind backend");
    socket.listen(1024).expect("listen backend")
}

/// Serves one connection, counted as open until `open` is dropped.
async fn serve(mut stream: TcpStream, behaviour: Behaviour, open: Open) -> Ending {
    match behaviour {
        Behaviour::Echo => {
            let (mut r, mut w) = stream.split();
            let mut buf = vec![0u8; 64 * 1024];
            let mut hash = Fnv::default();
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => {
                        drop(open);
                        let _ = w.shutdown().await;
                        return Ending::Eof {
                            bytes: hash.len,
                            hash: hash.value(),
                        };
                    }
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        if let Err(e) = w.write_all(&buf[..n]).await {
                            return io_ending(e, hash.len);
                        }
                    }
                    Err(e) => return io_ending(e, hash.len),
                }
            }
        }
        Behaviour::ServerClosesFirst => {
            let mut len = [0u8; 8];
            if let Err(e) = stream.read_exact(&mut len).await {
                return io_ending(e, 0);
            }
            let data = pattern(u64::from_be_bytes(len) as usize, 7);
            if let Err(e) = stream.write_all(&data).await {
                return io_ending(e, 8);
            }
            let _ = stream.shutdown().await;
            read_to_end_hashed(&mut stream).await
        }
        Behaviour::ResetAfter { after } => {
            let mut buf = vec![0u8; after as usize];
            let _ = stream.read_exact(&mut buf).await;
            let _ = stream.set_zero_linger();
            drop(stream);
            Ending::Reset { bytes: after }
        }
        Behaviour::Hold => read_to_end_hashed(&mut stream).await,
        Behaviour::Stall => {
            let mut first = vec![0u8; 64 * 1024];
            match stream.read(&mut first).await {
                Ok(0) => read_to_end_hashed(&mut stream).await,
                Err(e) => io_ending(e, 0),
                // Never ends: the socket is dropped with the test's runtime, unread.
                Ok(_) => std::future::pending().await,
            }
        }
    }
}

async fn read_to_end_hashed(stream: &mut TcpStream) -> Ending {
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = Fnv::default();
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                return Ending::Eof {
                    bytes: hash.len,
                    hash: hash.value(),
                };
            }
            Ok(n) => hash.update(&buf[..n]),
            Err(e) => return io_ending(e, hash.len),
        }
    }
}

fn io_ending(e: io::Error, bytes: u64) -> Ending {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Ending::Reset { bytes },
        _ => Ending::Error(e.to_string()),
    }
}

/// A listener whose accept queue is full, so further SYNs are dropped: connects time out.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        // backlog 0 admits one connection; one more makes sure the queue is full.
        for _ in 0..2 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
            {
                fillers.push(s);
            }
        }
        Blackhole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Deterministic bytes for a test payload (xorshift64*), so both ends can regenerate them.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a 64: a cheap checksum both ends compute over a stream.
#[derive(Clone, Copy, Debug)]
pub struct Fnv {
    state: u64,
    pub len: u64,
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv {
            state: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.state ^= u64::from(*b);
            self.state = self.state.wrapping_mul(0x100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
    pub fn value(&self) -> u64 {
        self.state
    }
    pub fn of(data: &[u8]) -> u64 {
        let mut f = Fnv::default();
        f.update(data);
        f.value()
    }
}
