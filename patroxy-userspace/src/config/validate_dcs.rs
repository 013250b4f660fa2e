//! `[dcs]`: the etcd endpoints, Patroni's namespace and scope, TLS and auth of the DCS watch.
use std::time::Duration;

use super::{MIN_CHECK_INTERVAL, Validator};
use crate::config::{
    model::{CheckTls, Dcs, DcsAuth},
    raw::RawDcs,
};

/// Patroni's own default `namespace`.
const DEFAULT_NAMESPACE: &str = "/service";

/// The leader listeners' check interval from a leader change until one of their servers is UP
/// again, unless `burst_inter` says otherwise: the shortest check interval, so the new primary
/// is found within ~50 ms of answering (a few seconds of 20 checks a second per node).
const DEFAULT_BURST_INTER: Duration = MIN_CHECK_INTERVAL;

impl Validator<'_> {
    pub(super) fn dcs(&mut self, raw: &RawDcs) -> Dcs {
        if raw.etcd.get_ref().is_empty() {
            self.error(raw.etcd.span(), "dcs etcd needs at least one endpoint");
        }
        let https = raw.tls.is_some();
        for endpoint in raw.etcd.get_ref() {
            let e = endpoint.get_ref();
            let scheme_ok = if https {
                e.starts_with("https://")
            } else {
                e.starts_with("http://")
            };
            let parsed = reqwest::Url::parse(e);
            if !scheme_ok {
                let want = if https {
                    "https://host:port (the [dcs] tls table is set)"
                } else {
                    "http://host:port (https:// needs the [dcs] tls table)"
                };
                self.error(
                    endpoint.span(),
                    format!("dcs etcd endpoint {e:?} must be {want}"),
                );
            } else if parsed
                .as_ref()
                .map_or(true, |u| u.host().is_none() || u.port().is_none())
            {
                self.error(
                    endpoint.span(),
                    format!("dcs etcd endpoint {e:?} must name a host and a port"),
                );
            }
        }
        let namespace = match &raw.namespace {
            None => DEFAULT_NAMESPACE.to_owned(),
            Some(n) => {
                let trimmed = n.get_ref().trim_end_matches('/');
                if !n.get_ref().starts_with('/') || trimmed.is_empty() {
                    self.error(
                        n.span(),
                        format!(
                            "dcs namespace {:?} must start with '/' and name something (Patroni's default is \"/service\")",
                            n.get_ref()
                        ),
                    );
                }
                trimmed.to_owned()
            }
        };
        let scope = raw.scope.get_ref();
        if scope.is_empty() || scope.contains(|c: char| c == '/' || c.is_whitespace()) {
            self.error(
                raw.scope.span(),
                format!("dcs scope {scope:?} must be non-empty without '/' or spaces"),
            );
        }
        let auth = match (&raw.user, &raw.password) {
            (Some(user), Some(password)) => Some(DcsAuth {
                user: user.get_ref().clone(),
                password: password.get_ref().clone(),
            }),
            (Some(user), None) => {
                self.error(user.span(), "dcs user is set but password is not");
                None
            }
            (None, Some(password)) => {
                self.error(password.span(), "dcs password is set but user is not");
                None
            }
            (None, None) => None,
        };
        let tls = raw.tls.as_ref().map(|t| {
            let t = t.get_ref();
            if t.client_cert.is_some() != t.client_key.is_some() {
                let span = t
                    .client_cert
                    .as_ref()
                    .or(t.client_key.as_ref())
                    .map(|s| s.span())
                    .unwrap_or_default();
                self.error(
                    span,
                    "dcs tls client_cert and client_key go together; set both or neither",
                );
            }
            self.tls_files(t);
            CheckTls {
                ca_file: t.ca_file.get_ref().clone(),
                client_cert: t.client_cert.as_ref().map(|c| c.get_ref().clone()),
                client_key: t.client_key.as_ref().map(|k| k.get_ref().clone()),
            }
        });
        Dcs {
            etcd: raw
                .etcd
                .get_ref()
                .iter()
                .map(|e| e.get_ref().clone())
                .collect(),
            namespace,
            scope: scope.clone(),
            tls,
            auth,
            burst_inter: raw.burst_inter.as_ref().map_or(DEFAULT_BURST_INTER, |d| {
                self.duration(d, "dcs burst_inter", MIN_CHECK_INTERVAL)
            }),
        }
    }
}
