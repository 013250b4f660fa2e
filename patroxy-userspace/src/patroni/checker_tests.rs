//! The checker against a fake Patroni, in real (short) time: HTTP needs real sockets.
use std::{sync::Arc, time::Duration};

use patroxy_tests::fake_patroni::{FakePatroni, Reply};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::*;
use crate::config::model::{Config, Listener, ServerSpec};
use crate::patroni::{
    client::{CheckStatus, Role},
    health::ServerState,
    test_config::*,
};

struct Running {
    rx: watch::Receiver<Arc<HealthSnapshot>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    fn start(config: &Config) -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let rx = spawn_checker(config, cancel.clone(), &tracker)
            .expect("checker starts")
            .subscribe();
        Running {
            rx,
            cancel,
            tracker,
        }
    }

    async fn until(
        &mut self,
        what: &str,
        mut f: impl FnMut(&HealthSnapshot) -> bool,
    ) -> Arc<HealthSnapshot> {
        let wait = self.rx.wait_for(|s| f(s));
        let snap = tokio::time::timeout(Duration::from_secs(3), wait).await;
        snap.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("checker alive")
            .clone()
    }

    fn now(&self) -> Arc<HealthSnapshot> {
        self.rx.borrow().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

const K00: BackendKey = BackendKey {
    listener: 0,
    server: 0,
};

fn up(key: BackendKey) -> impl Fn(&HealthSnapshot) -> bool {
    move |s| s.server(key).unwrap().is_up()
}

fn down(key: BackendKey) -> impl Fn(&HealthSnapshot) -> bool {
    move |s| !s.server(key).unwrap().is_up()
}

fn one_server(fake: &FakePatroni, authoritative: bool, t: CheckTiming) -> Config {
    let servers = vec![server("pg1", fake.addr(), t)];
    config(
        vec![listener(
            "postgres_write",
            Some(check("/primary", authoritative)),
            servers,
        )],
        None,
    )
}

#[tokio::test]
async fn rises_then_authoritative_503_drops_after_one_check() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::primary(4));
    let mut run = Running::start(&one_server(&fake, true, timing(100, 30, 30, 2, 3)));
    assert_eq!(
        run.now().server(K00).unwrap().health.server_state(),
        ServerState::Down
    );
    let s = run.until("UP", up(K00)).await;
    assert_eq!(
        fake.requests("/primary"),
        2,
        "rise 2: UP after exactly two good checks"
    );
    let h = &s.server(K00).unwrap().health;
    assert_eq!((h.role.clone(), h.timeline), (Some(Role::Primary), Some(4)));
    assert_eq!(h.last_check.as_ref().unwrap().status, CheckStatus::L7Ok);

    fake.reset_counts();
    fake.set("/primary", Reply::replica(503, 5));
    let s = run.until("DOWN", down(K00)).await;
    assert_eq!(
        fake.requests("/primary"),
        1,
        "authoritative: one 503 is enough"
    );
    let h = &s.server(K00).unwrap().health;
    assert_eq!((h.down_transitions, h.failed_checks), (1, 1));
    assert_eq!(h.last_check.as_ref().unwrap().code, Some(503));
    assert_eq!((h.role.clone(), h.timeline), (Some(Role::Replica), Some(5)));
}

#[tokio::test]
async fn strict_haproxy_503_takes_fall_checks() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::primary(1));
    let mut run = Running::start(&one_server(&fake, false, timing(100, 30, 30, 2, 3)));
    run.until("UP", up(K00)).await;
    fake.reset_counts();
    fake.set("/primary", Reply::replica(503, 2));
    let s = run
        .until("UP 2/3", |s| {
            s.server(K00).unwrap().health.server_state().to_string() == "UP 2/3"
        })
        .await;
    assert!(
        s.server(K00).unwrap().is_up(),
        "still carries traffic while going down"
    );
    let s = run.until("DOWN", down(K00)).await;
    assert_eq!(fake.requests("/primary"), 3);
    assert_eq!(s.server(K00).unwrap().health.failed_checks, 3);
}

#[tokio::test]
async fn api_that_never_answers_goes_down_after_fall_timeouts() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::primary(1));
    // inter bounds the whole check when timeout check is unset.
    let mut run = Running::start(&one_server(&fake, true, timing(100, 30, 30, 1, 3)));
    run.until("UP", up(K00)).await;
    fake.reset_counts();
    fake.set("/primary", Reply::hang());
    let s = run.until("DOWN", down(K00)).await;
    assert_eq!(
        fake.requests("/primary"),
        3,
        "timeouts are not authoritative"
    );
    let last = s.server(K00).unwrap().health.last_check.clone().unwrap();
    assert_eq!(last.status, CheckStatus::L7Tout);
    assert!(
        last.duration >= Duration::from_millis(95),
        "{:?}",
        last.duration
    );
    assert_eq!(
        fake.max_concurrent("/primary"),
        1,
        "a hung check is never stacked"
    );
}

#[tokio::test]
async fn timeout_check_is_the_read_timeout() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::hang());
    let mut cfg = one_server(&fake, true, timing(1000, 30, 30, 1, 1));
    cfg.listeners[0].servers[0].init_state = crate::config::model::InitState::Up;
    cfg.defaults.timeout_check = Some(Duration::from_millis(80));
    let mut run = Running::start(&cfg);
    let s = run.until("DOWN", down(K00)).await;
    let last = s.server(K00).unwrap().health.last_check.clone().unwrap();
    assert_eq!(last.status, CheckStatus::L7Tout);
    let d = last.duration;
    assert!(
        d >= Duration::from_millis(75) && d < Duration::from_millis(500),
        "{d:?}"
    );
}

#[tokio::test]
async fn garbage_and_huge_bodies_are_l7rsp_and_count_against_fall() {
    for reply in [
        Reply::garbage(b"\x16\x03\x01 definitely not http\r\n\r\n"),
        Reply::huge_body(8 << 20),
    ] {
        let fake = FakePatroni::start().await;
        fake.set("/primary", reply);
        let mut cfg = one_server(&fake, true, timing(100, 30, 30, 2, 2));
        cfg.listeners[0].servers[0].init_state = crate::config::model::InitState::Up;
        let mut run = Running::start(&cfg);
        let s = run.until("a check", |s| s.generation >= 1).await;
        let h = &s.server(K00).unwrap().health;
        assert_eq!(h.last_check.as_ref().unwrap().status, CheckStatus::L7Rsp);
        assert_eq!(
            h.server_state().to_string(),
            "UP 1/2",
            "one bad answer is not enough"
        );
        run.until("DOWN", down(K00)).await;
        assert_eq!(fake.requests("/primary"), 2);
    }
}

#[tokio::test]
async fn refused_connections_are_l4con() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::primary(1));
    let mut run = Running::start(&one_server(&fake, true, timing(100, 30, 30, 1, 2)));
    run.until("UP", up(K00)).await;
    fake.stop();
    let s = run.until("DOWN", down(K00)).await;
    let h = &s.server(K00).unwrap().health;
    assert_eq!(h.last_check.as_ref().unwrap().status, CheckStatus::L4Con);
    assert_eq!(h.failed_checks, 2);
}

#[tokio::test]
async fn listeners_sharing_a_path_share_one_check_stream() {
    let node = FakePatroni::start().await;
    node.set(
        "/primary",
        Reply::primary(1).with_latency(Duration::from_millis(20)),
    );
    node.set(
        "/replica",
        Reply::replica(503, 1).with_latency(Duration::from_millis(20)),
    );
    let t = timing(40, 20, 40, 1, 1);
    let l = |name: &str, path: &str| {
        listener(
            name,
            Some(check(path, true)),
            vec![server("pg1", node.addr(), t)],
        )
    };
    let cfg = config(
        vec![
            l("write", "/primary"),
            l("write_copy", "/primary"),
            l("read", "/replica"),
        ],
        None,
    );
    let run = Running::start(&cfg);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = run.now();
    let (w, copy) = (
        s.listener(0)[0].health.clone(),
        s.listener(1)[0].health.clone(),
    );
    assert!(w.is_up() && copy.is_up() && !s.listener(2)[0].is_up());
    assert_eq!(
        w.last_check.unwrap().at,
        copy.last_check.unwrap().at,
        "one result feeds both"
    );
    let (primary, replica) = (node.requests("/primary"), node.requests("/replica"));
    // One stream per path: a check every ~60 ms (20 ms answer + 40 ms inter) for /primary;
    // every ~40 ms for /replica (20 ms answer + 20 ms fastinter: no server of `read` is UP).
    // Two streams would double either count.
    assert!(
        (6..=14).contains(&primary),
        "{primary} /primary checks in 700 ms"
    );
    assert!(
        (10..=21).contains(&replica),
        "{replica} /replica checks in 700 ms"
    );
    assert_eq!(node.max_concurrent("/primary"), 1);
    assert_eq!(node.max_concurrent("/replica"), 1);
}

#[tokio::test]
async fn slow_answers_are_never_stacked() {
    let node = FakePatroni::start().await;
    // The answer takes longer than the interval: the next check must wait for it.
    node.set(
        "/primary",
        Reply::primary(1).with_latency(Duration::from_millis(60)),
    );
    let mut cfg = one_server(&node, true, timing(10, 10, 10, 1, 1));
    // With `timeout check` the answer may take longer than `inter` (without, inter bounds it).
    cfg.defaults.timeout_check = Some(Duration::from_millis(500));
    let run = Running::start(&cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(run.now().server(K00).unwrap().is_up(), "60 ms answers pass");
    drop(run);
    let n = node.requests("/primary");
    assert!(
        (4..=8).contains(&n),
        "{n} checks of 60 ms + 10 ms in 500 ms"
    );
    assert_eq!(node.max_concurrent("/primary"), 1);
}

#[tokio::test]
async fn a_changing_peer_puts_the_listener_on_fastinter() {
    let (a, b) = (FakePatroni::start().await, FakePatroni::start().await);
    a.set("/primary", Reply::primary(1));
    b.set("/primary", Reply::replica(503, 1));
    // downinter is long: without the group rule B would wait 5 s before its next check.
    let t = timing(300, 40, 5000, 2, 3);
    let servers: Vec<ServerSpec> = vec![server("a", a.addr(), t), server("b", b.addr(), t)];
    let l: Listener = listener("postgres_write", Some(check("/primary", false)), servers);
    let mut run = Running::start(&config(vec![l], None));
    let kb = BackendKey {
        listener: 0,
        server: 1,
    };
    run.until("A UP, B tried", |s| {
        up(K00)(s) && s.server(kb).unwrap().health.last_check.is_some()
    })
    .await;
    // Switchover: A is demoted (not authoritative: it goes through UP 2/3), B promoted.
    a.set("/primary", Reply::replica(503, 2));
    b.set("/primary", Reply::primary(2));
    let flipped = tokio::time::Instant::now();
    run.until("B UP", up(kb)).await;
    let took = flipped.elapsed();
    assert!(took < Duration::from_millis(1500), "B found in {took:?}");
    let s = run.until("A DOWN", down(K00)).await;
    assert_eq!(s.server(K00).unwrap().health.down_transitions, 1);
}

#[tokio::test]
async fn a_listener_without_an_up_server_is_checked_at_fastinter() {
    // A killed primary: the only candidate is DOWN (503) until Patroni promotes it.
    let a = FakePatroni::start().await;
    a.set("/primary", Reply::replica(503, 1));
    let t = timing(300, 40, 5000, 2, 3);
    let l: Listener = listener(
        "postgres_write",
        Some(check("/primary", false)),
        vec![server("a", a.addr(), t)],
    );
    let mut run = Running::start(&config(vec![l], None));
    run.until("A checked", |s| {
        s.server(K00).unwrap().health.last_check.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Promoted: found at fastinter (40 ms), not after downinter (5 s).
    a.set("/primary", Reply::primary(2));
    let promoted = tokio::time::Instant::now();
    run.until("A UP", up(K00)).await;
    let took = promoted.elapsed();
    assert!(took < Duration::from_millis(1000), "A found in {took:?}");
}

#[tokio::test]
async fn unchecked_listeners_are_up_and_cancel_stops_checks() {
    let node = FakePatroni::start().await;
    node.set("/primary", Reply::primary(1));
    let t = timing(20, 20, 20, 1, 1);
    let cfg = config(
        vec![
            listener("plain", None, vec![server("pg1", node.addr(), t)]),
            listener(
                "write",
                Some(check("/primary", true)),
                vec![server("pg1", node.addr(), t)],
            ),
        ],
        None,
    );
    let mut run = Running::start(&cfg);
    let s = run.now();
    assert!(s.listener(0)[0].is_up());
    assert_eq!(s.listener(0)[0].health.server_state(), ServerState::NoCheck);
    assert_eq!((s.listener(0)[0].id, s.listener(1)[0].id), (1, 2));
    run.until("UP", |s| s.listener(1)[0].is_up()).await;
    run.cancel.cancel();
    run.tracker.close();
    tokio::time::timeout(Duration::from_secs(1), run.tracker.wait())
        .await
        .expect("tasks end");
    let n = node.requests("/primary");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(node.requests("/primary"), n, "no checks after cancel");
}

#[tokio::test]
async fn client_methods_queries_and_bad_tls_files() {
    use crate::config::model::{CheckMethod, CheckTls};
    use crate::patroni::client::{CheckClient, CheckTimeouts, ClientError};
    let node = FakePatroni::start().await;
    node.set("/replica?lag=16MB", Reply::replica(200, 9));
    let timeouts = CheckTimeouts::new(Duration::from_secs(1), Duration::from_secs(1), None);
    let client = |method, path: &str| {
        let mut c = check(path, true);
        c.method = method;
        CheckClient::new(node.addr(), &c, timeouts).unwrap()
    };
    // The exact query reaches Patroni; GET reads role and timeline from the body.
    let o = client(CheckMethod::Get, "/replica?lag=16MB").check().await;
    assert_eq!((o.status, o.code), (CheckStatus::L7Ok, Some(200)));
    assert_eq!((o.role, o.timeline), (Some(Role::Replica), Some(9)));
    assert_eq!(
        client(CheckMethod::Get, "/replica?lag=1MB")
            .check()
            .await
            .code,
        Some(503)
    );
    // HEAD and OPTIONS: the status line decides, no body is read.
    for method in [CheckMethod::Head, CheckMethod::Options] {
        let o = client(method, "/replica?lag=16MB").check().await;
        assert_eq!(
            (o.status, o.role.clone()),
            (CheckStatus::L7Ok, None),
            "{method:?}"
        );
    }
    let mut c = check("/primary", true);
    c.tls = Some(CheckTls {
        ca_file: "/nonexistent/ca.pem".into(),
        client_cert: None,
        client_key: None,
    });
    let err = CheckClient::new(node.addr(), &c, timeouts).unwrap_err();
    assert!(matches!(err, ClientError::TlsFile { .. }), "{err}");
}

#[tokio::test]
async fn reconfigure_keeps_the_state_of_the_same_check_and_restarts_a_changed_one() {
    let fake = FakePatroni::start().await;
    fake.set("/primary", Reply::primary(1));
    fake.set("/leader", Reply::primary(1));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let running = one_server(&fake, true, timing(100, 30, 30, 2, 3));
    let checker = spawn_checker(&running, cancel.clone(), &tracker).expect("checker starts");
    let mut run = Running {
        rx: checker.subscribe(),
        cancel,
        tracker,
    };
    run.until("UP", up(K00)).await;
    // A new timing and rise: UP at once, no new rise wait.
    let mut retimed = running.clone();
    retimed.listeners[0].servers[0].timing = timing(200, 50, 50, 5, 2);
    checker.reconfigure(&running, &retimed).unwrap();
    let now = run.now();
    let h = &now.server(K00).unwrap().health;
    assert_eq!(h.server_state(), ServerState::Up);
    assert_eq!(h.down_transitions, 0);
    // Another question (a new path): the answer to the old one no longer holds.
    let mut asked_again = retimed.clone();
    asked_again.listeners[0].check = Some(check("/leader", true));
    checker.reconfigure(&retimed, &asked_again).unwrap();
    assert_eq!(
        run.now().server(K00).unwrap().health.server_state(),
        ServerState::Down
    );
    run.until("UP on the new check", up(K00)).await;
    assert!(fake.requests("/leader") >= 5, "rise 5 on the new path");
}

#[test]
fn a_successor_keeps_a_state_only_for_the_same_question() {
    let api = "127.0.0.1:8008".parse().unwrap();
    let t = timing(2000, 1000, 2000, 3, 3);
    let config = crate::patroni::test_config::config(
        vec![listener(
            "w",
            Some(check("/primary", true)),
            vec![server("a", api, t), server("b", api, t)],
        )],
        None,
    );
    let ids = ServerIds::fresh(&config);
    let now = Instant::now();
    let mut state = HealthSnapshot::initial(&config, now);
    for s in &mut state.listeners[0].servers {
        s.health = ServerHealth::new(&t, InitState::Up, true, now);
    }
    let carried = state.carry(&config);
    assert!(carried.iter().all(|c| c.up && c.check.is_some()));
    // The successor's file moved b's checks to another node: b starts over (DOWN, rise 3).
    let mut next = config.clone();
    next.listeners[0].servers[1].check_addr = "127.0.0.1:8009".parse().unwrap();
    let successor = HealthSnapshot::carried_over(&next, &ids, &carried, now);
    let a = successor.server(K00).unwrap();
    let b = successor
        .server(BackendKey {
            listener: 0,
            server: 1,
        })
        .unwrap();
    assert!(a.is_up(), "a keeps UP with no rise wait");
    assert!(!b.is_up(), "b answered another question");
}

/// Two nodes behind a leader listener watched through `[dcs]`: pg1 the primary on timeline
/// 4, pg2 a replica; slow steady checks (2 s) and `rise` 3, so anything faster is the watch.
async fn watched_pair() -> (FakePatroni, FakePatroni, Checker, Running) {
    let (fake1, fake2, checker, mut run) = watched_pair_starting().await;
    // Both settled: pg1 UP at inter, pg2 DOWN at downinter.
    run.until("pg2 checked", |s| {
        s.listener(0)[1].health.last_check.is_some()
    })
    .await;
    (fake1, fake2, checker, run)
}

/// [`watched_pair`] as soon as pg1 is UP: pg2's first check still waits for its turn (offset
/// 1 s, half the interval).
async fn watched_pair_starting() -> (FakePatroni, FakePatroni, Checker, Running) {
    let (fake1, fake2) = (FakePatroni::start().await, FakePatroni::start().await);
    fake1.set("/primary", Reply::primary(4));
    fake2.set("/primary", Reply::replica(503, 4));
    let t = timing(2000, 30, 2000, 3, 3);
    let mut cfg = config(
        vec![listener(
            "postgres_write",
            Some(check("/primary", true)),
            vec![
                server("pg1", fake1.addr(), t),
                server("pg2", fake2.addr(), t),
            ],
        )],
        None,
    );
    cfg.dcs = Some(crate::config::Dcs {
        etcd: vec!["http://127.0.0.1:2379".into()],
        namespace: "/service".into(),
        scope: "demo".into(),
        tls: None,
        auth: None,
        burst_inter: Duration::from_millis(50),
    });
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let checker = spawn_checker(&cfg, cancel.clone(), &tracker).expect("checker starts");
    let mut run = Running {
        rx: checker.subscribe(),
        cancel,
        tracker,
    };
    run.until("pg1 UP", up(K00)).await;
    (fake1, fake2, checker, run)
}

#[tokio::test]
async fn a_leader_change_before_a_servers_first_check_does_not_wait_for_its_turn() {
    let (_fake1, fake2, checker, mut run) = watched_pair_starting().await;
    assert!(run.now().listener(0)[1].health.last_check.is_none());
    fake2.set("/primary", Reply::primary(5));
    let moved = std::time::Instant::now();
    checker
        .leader_events()
        .leader_moved(Some("pg1"), Some("pg2"), |s| s.leader = Some("pg2".into()));
    run.until("pg2 UP", up(K01)).await;
    assert!(
        moved.elapsed() < Duration::from_millis(500),
        "pg2 waited {:?} for its first check's turn (1 s after start) instead of the burst",
        moved.elapsed()
    );
}

const K01: BackendKey = BackendKey {
    listener: 0,
    server: 1,
};

#[tokio::test]
async fn a_leader_key_leaving_fences_at_once_and_the_new_primary_is_up_without_rise() {
    let (fake1, fake2, checker, mut run) = watched_pair().await;
    // Patroni promoted pg2 (timeline 5); pg1's checks have not noticed yet (2 s apart).
    fake2.set("/primary", Reply::primary(5));
    fake2.reset_counts();
    let events = checker.leader_events();
    events.leader_moved(Some("pg1"), Some("pg2"), |s| s.leader = Some("pg2".into()));
    let s = run.now();
    assert!(
        !s.server(K00).unwrap().is_up(),
        "pg1 DOWN in the same publish"
    );
    assert_eq!(s.server(K00).unwrap().health.down_transitions, 1);
    assert_eq!(s.dcs.as_ref().unwrap().leader.as_deref(), Some("pg2"));
    let started = std::time::Instant::now();
    run.until("pg2 UP", up(K01)).await;
    assert_eq!(
        fake2.requests("/primary"),
        1,
        "the key's holder is UP on its first 200, not after rise (3)"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "found by the burst, not at downinter (2 s): {:?}",
        started.elapsed()
    );
    // pg1 keeps answering 200 on the old timeline: held DOWN while the key names another.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake1.requests("/primary") >= 3, "pg1 checked past its rise");
    assert!(!run.now().server(K00).unwrap().is_up(), "pg1 held DOWN");
    // The watch losing etcd releases it: its checks decide again.
    events.leader_read(None, |_| {});
    run.until("pg1 UP by its checks", up(K00)).await;
}

#[tokio::test]
async fn losing_the_dcs_marks_nothing_down() {
    let (_fake1, _fake2, checker, mut run) = watched_pair().await;
    let before = run.now();
    checker.leader_events().update_status(|s| {
        s.connected = false;
        s.errors += 1;
        s.last_error = Some("connection refused".into());
    });
    let s = run
        .until("status published", |s| s.dcs.as_ref().unwrap().errors == 1)
        .await;
    assert!(s.server(K00).unwrap().is_up());
    assert_eq!(
        s.server(K00).unwrap().health.down_transitions,
        before.server(K00).unwrap().health.down_transitions
    );
    // A leader key that moved from a member no server is leaves the servers alone too.
    checker.leader_events().leader_moved(None, None, |_| {});
    assert!(run.now().server(K00).unwrap().is_up());
}
