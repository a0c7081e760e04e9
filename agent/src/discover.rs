//! Finding the controller through DNS: the SRV record `_sparegrid._tcp`
//! ([`SRV_SERVICE`]) in `controller.discover_domain`, or in the search
//! domains of `/etc/resolv.conf` when that is empty.
//!
//! Used once at start when `controller.discover = "srv"` and
//! `controller.url` is empty ([`controller_url`]). Of the records the
//! lowest priority wins and, among equals, the highest weight, then the
//! first target by name: every agent of a site picks the same controller
//! (RFC 2782's weighted random choice spreads clients over equal servers;
//! sparegrid has one controller per site, so a stable choice is what an
//! operator can reason about). The URL is `https://target:port` when
//! `https` is asked for, else `http://`.
//!
//! The lookup itself is `hickory-resolver`'s; it runs on a small
//! current-thread tokio runtime so callers stay synchronous.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::Resolver;

/// The service and protocol labels of the controller's SRV record.
pub const SRV_SERVICE: &str = "_sparegrid._tcp";

/// One SRV target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Host name, without the trailing dot.
    pub target: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("DNS SRV lookup of {name}: cannot set up the resolver: {message}")]
    Resolver { name: String, message: String },
    #[error("DNS SRV lookup of {name} failed: {message}")]
    Lookup { name: String, message: String },
    #[error("DNS SRV lookup of {name}: no usable record (a target of \".\" means the service is not offered)")]
    NoRecord { name: String },
}

/// The name to look up: `_sparegrid._tcp.<domain>`, or the bare
/// `_sparegrid._tcp` (resolved through the search domains) when `domain` is empty.
pub fn srv_name(domain: &str) -> String {
    let domain = domain.trim_matches('.');
    if domain.is_empty() {
        SRV_SERVICE.to_string()
    } else {
        format!("{SRV_SERVICE}.{domain}")
    }
}

/// The preferred target (see the module docs); `None` when there is none
/// (or only `.`, "service not available").
pub fn choose(records: &[SrvTarget]) -> Option<&SrvTarget> {
    records
        .iter()
        .filter(|r| !r.target.is_empty() && r.target != ".")
        .min_by(|a, b| {
            (a.priority, std::cmp::Reverse(a.weight), &a.target).cmp(&(
                b.priority,
                std::cmp::Reverse(b.weight),
                &b.target,
            ))
        })
}

/// Looks up the SRV records of `name`. `nameserver` replaces the system's
/// resolvers (tests, or an operator's own DNS server).
pub fn lookup(
    name: &str,
    nameserver: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<SrvTarget>, DiscoverError> {
    let resolver_err = |message: String| DiscoverError::Resolver {
        name: name.to_string(),
        message,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| resolver_err(e.to_string()))?;
    let mut builder = match nameserver {
        Some(addr) => {
            let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio().map_err(|e| resolver_err(e.to_string()))?,
    };
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 2;
    *builder.options_mut() = opts;
    let resolver = builder.build().map_err(|e| resolver_err(e.to_string()))?;
    let lookup = rt
        .block_on(resolver.srv_lookup(name))
        .map_err(|e| DiscoverError::Lookup {
            name: name.to_string(),
            message: e.to_string(),
        })?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(SrvTarget {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: srv.target.to_utf8().trim_end_matches('.').to_string(),
            }),
            _ => None,
        })
        .collect())
}

/// How many times [`resolve`] asks before giving up, and the pause between.
const RESOLVE_TRIES: u32 = 3;
const RESOLVE_PAUSE: Duration = Duration::from_secs(2);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Fills `cfg.controller.url` from DNS when it is empty and
/// `controller.discover = "srv"` (a few tries: DNS may not be up yet at
/// boot). Returns the URL it found, `None` when there was nothing to do.
pub fn resolve(cfg: &mut crate::config::Config) -> Result<Option<String>, DiscoverError> {
    let c = &cfg.controller;
    if !c.url.is_empty() || c.discover != crate::config::Discover::Srv {
        return Ok(None);
    }
    let mut tries = 0;
    let url = loop {
        tries += 1;
        match controller_url(
            &c.discover_domain,
            c.discover_nameserver(),
            c.discover_https,
            RESOLVE_TIMEOUT,
        ) {
            Ok(url) => break url,
            Err(e) if tries < RESOLVE_TRIES => {
                tracing::warn!("{e}; asking again in {RESOLVE_PAUSE:?}");
                std::thread::sleep(RESOLVE_PAUSE);
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        "controller found through DNS ({}): {url}",
        srv_name(&c.discover_domain)
    );
    cfg.controller.url = url.clone();
    Ok(Some(url))
}

/// The controller URL from the SRV record in `domain` (see the module docs).
pub fn controller_url(
    domain: &str,
    nameserver: Option<SocketAddr>,
    https: bool,
    timeout: Duration,
) -> Result<String, DiscoverError> {
    let name = srv_name(domain);
    let records = lookup(&name, nameserver, timeout)?;
    let best = choose(&records).ok_or(DiscoverError::NoRecord { name: name.clone() })?;
    let scheme = if https { "https" } else { "http" };
    let host = if best.target.contains(':') {
        format!("[{}]", best.target)
    } else {
        best.target.clone()
    };
    Ok(format!("{scheme}://{host}:{}", best.port))
}

#[cfg(test)]
#[path = "discover_tests.rs"]
mod tests;
