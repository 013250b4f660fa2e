//! The stats server's one write path, HAProxy's `set server <backend>/<server> state ...`:
//! `POST /admin/servers/{listener}/{server}` with `state=ready|drain|maint` in the query or a
//! form body sets the server's admin state ([`crate::operator_state`]). `[stats] admin` decides
//! who may: nobody, clients on this host (the default), or anyone reaching the bind; with
//! `[stats] admin_auth_file` they must also send its token (`Authorization: Bearer <token>`),
//! since "this host" includes every local user. A request a browser sends for another site (an
//! `Origin` that is not this server) is refused too: a page on the web must not be able to
//! drain a database.
//!
//! Answers are one line of text: 200 with what changed, 400 for a missing or unknown state, 401
//! without the right token, 403 when the peer may not, 404 for an unknown listener or server.
use std::net::SocketAddr;

use axum::http::StatusCode;

use crate::{
    config::{AdminAccess, AdminToken},
    operator_state::{AdminState, AdminWriter},
};

/// Both ends of a stats connection. A client on this host that connects to one of the host's
/// non-loopback addresses comes from that same address, so `local` lets `[stats] admin =
/// "local"` recognise it when the stats server is bound to a LAN address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
}

impl Peer {
    fn on_this_host(&self) -> bool {
        let remote = self.remote.ip().to_canonical();
        remote.is_loopback() || self.local.is_some_and(|l| l.ip().to_canonical() == remote)
    }
}

/// One admin request, taken apart by the HTTP layer.
#[derive(Debug)]
pub struct Request<'a> {
    pub peer: Peer,
    /// The `Origin` and `Host` headers, when sent (browsers send `Origin` on every POST).
    pub origin: Option<&'a str>,
    pub host: Option<&'a str>,
    /// The `Authorization` header, when sent.
    pub authorization: Option<&'a str>,
    pub listener: &'a str,
    pub server: &'a str,
    pub query: Option<&'a str>,
    pub body: &'a str,
}

/// Decides and applies one request; returns the HTTP status and the line to answer. `token`
/// is the one of `[stats] admin_auth_file`, if set.
pub fn set_state(
    access: AdminAccess,
    token: Option<&AdminToken>,
    admin: &AdminWriter,
    req: &Request,
) -> (StatusCode, String) {
    if let Some(why) = forbidden(access, req) {
        return (StatusCode::FORBIDDEN, format!("forbidden: {why}\n"));
    }
    if let Some(why) = token.and_then(|t| unauthorized(t, req.authorization)) {
        return (StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n"));
    }
    let Some(word) = param(req.query.unwrap_or(""), "state").or_else(|| param(req.body, "state"))
    else {
        return (
            StatusCode::BAD_REQUEST,
            "missing state: send state=ready|drain|maint (query or form body)\n".into(),
        );
    };
    let state: AdminState = match word.parse() {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match admin.set(req.listener, req.server, state, req.peer.remote.ip()) {
        Ok(change) => (
            StatusCode::OK,
            format!("{}\n", change.describe(req.listener, req.server)),
        ),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")),
    }
}

/// Why `POST /admin/reload` from this caller is refused, by the same rules as a state change
/// (the address first, then the token): the status and the line to answer.
pub fn refused_reload(
    access: AdminAccess,
    token: Option<&AdminToken>,
    req: &Request,
) -> Option<(StatusCode, String)> {
    if let Some(why) = forbidden(access, req) {
        return Some((StatusCode::FORBIDDEN, format!("forbidden: {why}\n")));
    }
    token
        .and_then(|t| unauthorized(t, req.authorization))
        .map(|why| (StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n")))
}

fn forbidden(access: AdminAccess, req: &Request) -> Option<String> {
    let peer = req.peer.remote.ip().to_canonical();
    match access {
        AdminAccess::Off => {
            return Some("the admin endpoint is off ([stats] admin = \"off\")".into());
        }
        AdminAccess::Local if !req.peer.on_this_host() => {
            return Some(format!(
                "{peer} is not on this host ([stats] admin = \"local\")"
            ));
        }
        _ => {}
    }
    match (req.origin, req.host) {
        (Some(origin), Some(host)) if origin == format!("http://{host}") => None,
        (Some(origin), _) => Some(format!("cross-origin request from {origin}")),
        (None, _) => None,
    }
}

/// Why `authorization` does not carry `token`, if it does not.
fn unauthorized(token: &AdminToken, authorization: Option<&str>) -> Option<&'static str> {
    let Some(header) = authorization else {
        return Some(
            "admin requests need the token of [stats] admin_auth_file (Authorization: Bearer <token>)",
        );
    };
    let presented = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match presented {
        None => Some("expected Authorization: Bearer <token>"),
        Some(t) if token.matches(t) => None,
        Some(_) => Some("wrong token"),
    }
}

/// The value of `key` in `a=b&c=d` text (a query string or a form body), trimmed.
fn param<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.trim()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::patroni::{BackendKey, test_config::*};

    fn admin() -> AdminWriter {
        let a: SocketAddr = "127.0.0.1:8008".parse().unwrap();
        let t = timing(100, 50, 100, 2, 3);
        AdminWriter::new(Arc::new(config(
            vec![listener(
                "postgres_read",
                None,
                vec![server("pg1", a, t), server("pg2", a, t)],
            )],
            None,
        )))
    }

    fn peer(remote: &str, local: &str) -> Peer {
        Peer {
            remote: remote.parse().unwrap(),
            local: Some(local.parse().unwrap()),
        }
    }

    fn req<'a>(peer: Peer, server: &'a str, query: Option<&'a str>, body: &'a str) -> Request<'a> {
        Request {
            peer,
            origin: None,
            host: Some("127.0.0.1:7000"),
            authorization: None,
            listener: "postgres_read",
            server,
            query,
            body,
        }
    }

    fn lo() -> Peer {
        peer("127.0.0.1:40000", "127.0.0.1:7000")
    }

    #[test]
    fn sets_the_state_from_the_query_or_a_form_body() {
        let admin = admin();
        let rx = admin.subscribe();
        let (status, text) = set_state(
            AdminAccess::Local,
            None,
            &admin,
            &req(lo(), "pg2", Some("state=maint"), ""),
        );
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(
            text,
            "server pg2 of listener postgres_read set to MAINT (was READY)\n"
        );
        let key = BackendKey {
            listener: 0,
            server: 1,
        };
        assert_eq!(rx.borrow().get(key), AdminState::Maint);
        let (status, text) = set_state(
            AdminAccess::Any,
            None,
            &admin,
            &req(lo(), "pg2", None, "state=DRAIN\n"),
        );
        assert_eq!(
            (status, text.contains("set to DRAIN (was MAINT)")),
            (StatusCode::OK, true)
        );
        assert_eq!(rx.borrow().get(key), AdminState::Drain);
    }

    #[test]
    fn bad_requests_say_why() {
        let admin = admin();
        let call = |server, query: Option<&str>| {
            set_state(
                AdminAccess::Local,
                None,
                &admin,
                &req(lo(), server, query, ""),
            )
        };
        let (status, text) = call("pg1", Some("state=up"));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(text.contains("unknown state \"up\""), "{text}");
        assert_eq!(call("pg1", None).0, StatusCode::BAD_REQUEST);
        let (status, text) = call("pg9", Some("state=drain"));
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            text,
            "listener \"postgres_read\" has no server named \"pg9\"\n"
        );
        let mut r = req(lo(), "pg1", Some("state=drain"), "");
        r.listener = "nope";
        let (status, text) = set_state(AdminAccess::Local, None, &admin, &r);
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::NOT_FOUND, "no listener named \"nope\"\n")
        );
    }

    #[test]
    fn access_follows_the_stats_admin_setting() {
        let admin = admin();
        let rx = admin.subscribe();
        let remote = peer("192.0.2.7:40000", "192.0.2.1:7000");
        let same_host = peer("192.0.2.1:40000", "192.0.2.1:7000");
        let mapped = peer("[::ffff:127.0.0.1]:40000", "[::ffff:127.0.0.1]:7000");
        let lo2 = peer("127.0.0.2:40000", "127.0.0.1:7000");
        let cases = [
            (AdminAccess::Off, lo(), StatusCode::FORBIDDEN),
            (AdminAccess::Local, remote, StatusCode::FORBIDDEN),
            (AdminAccess::Local, same_host, StatusCode::OK),
            (AdminAccess::Local, mapped, StatusCode::OK),
            (AdminAccess::Local, lo2, StatusCode::OK),
            (AdminAccess::Any, remote, StatusCode::OK),
        ];
        for (access, peer, want) in cases {
            let (status, text) = set_state(
                access,
                None,
                &admin,
                &req(peer, "pg1", Some("state=ready"), ""),
            );
            assert_eq!(status, want, "{access:?} {peer:?}: {text}");
        }
        // Forbidden before anything else: no hint whether the names exist.
        let (status, text) = set_state(
            AdminAccess::Off,
            None,
            &admin,
            &req(lo(), "pg9", Some("state=bogus"), ""),
        );
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(text.contains("admin = \"off\""), "{text}");
        assert!(
            !rx.has_changed().unwrap(),
            "READY to READY publishes nothing new"
        );
    }

    #[test]
    fn with_a_token_file_the_token_is_asked_after_the_address() {
        let dir = std::env::temp_dir().join(format!("patroxy-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let token = AdminToken::read(&path).unwrap();
        let admin = admin();
        let call = |access, authorization| {
            let mut r = req(lo(), "pg1", Some("state=drain"), "");
            r.authorization = authorization;
            set_state(access, Some(&token), &admin, &r)
        };
        let (status, text) = call(AdminAccess::Local, None);
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(text.contains("Authorization: Bearer"), "{text}");
        let (status, text) = call(AdminAccess::Local, Some("Bearer 0123456789abcdef0124"));
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::UNAUTHORIZED, "unauthorized: wrong token\n")
        );
        assert_eq!(
            call(AdminAccess::Local, Some("Basic 0123456789abcdef0123")).0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(AdminAccess::Local, Some("bearer 0123456789abcdef0123")).0,
            StatusCode::OK
        );
        // The address is refused first: a remote peer learns nothing about the token.
        assert_eq!(
            call(AdminAccess::Off, Some("Bearer 0123456789abcdef0123")).0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn a_browser_request_from_another_site_is_refused() {
        let admin = admin();
        let mut r = req(lo(), "pg1", Some("state=maint"), "");
        r.origin = Some("https://evil.example");
        let (status, text) = set_state(AdminAccess::Any, None, &admin, &r);
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(text.contains("cross-origin"), "{text}");
        // The stats page itself (same origin) may.
        r.origin = Some("http://127.0.0.1:7000");
        assert_eq!(
            set_state(AdminAccess::Any, None, &admin, &r).0,
            StatusCode::OK
        );
    }
}
