//! Where the load goes: WebSocket URL templates, the HTTP publish URL,
//! source-address ranges, and the command-line value parsers (durations,
//! rates) that go with them.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Most source addresses one run spreads over (a /16 worth).
pub const SOURCE_ADDRESSES_MAX: usize = 65_536;
/// Most WebSocket URLs one run spreads its connections over (nodes of a cluster).
pub const URLS_MAX: usize = 256;

/// A URL split into what the generator needs: where to connect, what to
/// put in `Host:`, and the path (possibly a template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The whole URL as written, for reports.
    pub text: String,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`; may hold `{channel}` and `{n}`.
    pub path: String,
    /// `wss://` (or `https://`): TLS to the server.
    pub tls: bool,
}

impl Url {
    /// Parses `SCHEME://host[:port][/path]`. `{channel}` and `{n}` may appear
    /// in the path only.
    pub fn parse(text: &str, scheme: &str, default_port: u16) -> Result<Url, String> {
        let tls_scheme = format!("{scheme}s");
        let (rest, tls, default_port) = match text.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) {
            Some(rest) => (rest, false, default_port),
            None => match text.strip_prefix(tls_scheme.as_str()).and_then(|r| r.strip_prefix("://")) {
                // Only WebSocket targets speak TLS (the publish URL stays plain).
                Some(rest) if scheme == "ws" => (rest, true, 443),
                Some(_) => return Err(format!("`{text}`: TLS is supported for ws(s) URLs only")),
                None => return Err(format!("`{text}` must start with {scheme}:// or {tls_scheme}://")),
            },
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains(['{', '}', '@']) {
            return Err(format!("`{text}`: the host must be a plain host[:port]"));
        }
        let (host, port) = split_host_port(authority, default_port).map_err(|e| format!("`{text}`: {e}"))?;
        check_template(path).map_err(|e| format!("`{text}`: {e}"))?;
        Ok(Url { text: text.to_string(), authority: authority.to_string(), host, port, path: path.to_string(), tls })
    }

    /// The first IPv4 address (or any address) the host resolves to.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let addresses: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .collect();
        addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addresses.first())
            .copied()
            .ok_or_else(|| format!("{} resolves to no address", self.host))
    }

    pub fn has_channel_placeholder(&self) -> bool {
        self.path.contains("{channel}")
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let end = bracketed.find(']').ok_or("unclosed [ in the host")?;
        let after = &bracketed[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err("junk after ]".into()),
        };
        (&bracketed[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().map_err(|_| format!("bad port `{port}`"))?,
        None => default_port,
    };
    Ok((host.to_string(), port))
}

/// Only `{channel}` and `{n}` may appear in braces.
fn check_template(path: &str) -> Result<(), String> {
    let stripped = path.replace("{channel}", "").replace("{n}", "");
    if stripped.contains(['{', '}']) {
        return Err("only {channel} and {n} may appear in braces".into());
    }
    if !path.starts_with('/') || path.contains([' ', '\r', '\n']) {
        return Err("the path must start with / and contain no spaces".into());
    }
    Ok(())
}

/// Parses the `--url` values, each one URL or a comma-separated list of them,
/// in the order given. The same URL may appear twice (it then gets twice the
/// share); an empty entry is refused, since `a,,b` is more likely a typo than
/// a wish.
pub fn parse_urls(values: &[String]) -> Result<Vec<Url>, String> {
    let mut urls = Vec::new();
    for part in values.iter().flat_map(|value| value.split(',')).map(str::trim) {
        if part.is_empty() {
            return Err("--url: empty entry in the list".into());
        }
        if urls.len() == URLS_MAX {
            return Err(format!("--url: at most {URLS_MAX} URLs"));
        }
        urls.push(Url::parse(part, "ws", 80)?);
    }
    if urls.is_empty() {
        return Err("--url: no URL given".into());
    }
    Ok(urls)
}

/// Fills a path template for connection number `n` subscribed to `channel`.
pub fn expand(template: &str, channel: &str, n: u64) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    template.replace("{channel}", channel).replace("{n}", &n.to_string())
}

/// Parses source addresses: a count (`8`: 127.0.0.2 … 127.0.0.9), a range
/// (`127.0.0.2-127.0.0.20`), or a comma-separated list of either form.
pub fn parse_source_addresses(text: &str) -> Result<Vec<Ipv4Addr>, String> {
    let text = text.trim();
    if let Ok(count) = text.parse::<u32>() {
        if count == 0 || count as usize > SOURCE_ADDRESSES_MAX {
            return Err(format!("source address count {count} is out of range (1..={SOURCE_ADDRESSES_MAX})"));
        }
        let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
        return Ok((0..count).map(|i| Ipv4Addr::from(first + i)).collect());
    }
    let mut addresses = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (from, to) = match part.split_once('-') {
            Some((from, to)) => (from.trim(), to.trim()),
            None => (part, part),
        };
        let parse = |s: &str| s.parse::<Ipv4Addr>().map_err(|_| format!("`{s}` is not an IPv4 address"));
        let (from, to) = (u32::from(parse(from)?), u32::from(parse(to)?));
        if from > to {
            return Err(format!("range `{part}` goes backwards"));
        }
        if addresses.len() as u64 + u64::from(to - from) + 1 > SOURCE_ADDRESSES_MAX as u64 {
            return Err(format!("more than {SOURCE_ADDRESSES_MAX} source addresses"));
        }
        addresses.extend((from..=to).map(Ipv4Addr::from));
    }
    if addresses.is_empty() {
        return Err("no source addresses given".into());
    }
    Ok(addresses)
}

/// Parses a duration: `10` (seconds), `10s`, `500ms`, `2m`, `1.5s`.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, scale_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (text, 1000.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("`{text}` is not a duration (10s, 500ms, 2m)"))?;
    if !(value.is_finite() && value >= 0.0) || value * scale_ms > 1e12 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok((value * scale_ms).round() as u64)
}

/// A publication rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rate {
    PerSecond(f64),
    /// As fast as the server accepts, with a bounded window in flight.
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Rate, String> {
        if text.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        match text.trim().trim_end_matches("/s").parse::<f64>() {
            Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0 => Ok(Rate::PerSecond(rate)),
            _ => Err(format!("`{text}` is not a rate: a number of publications per second, or `max`")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate}/s"),
            Rate::Max => f.write_str("max"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_and_templates() {
        let url = Url::parse("ws://127.0.0.1:9000/sub/{channel}?id={n}", "ws", 80).unwrap();
        assert_eq!(url.authority, "127.0.0.1:9000");
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 9000));
        assert!(url.has_channel_placeholder());
        assert_eq!(expand(&url.path, "news", 42), "/sub/news?id=42");
        assert_eq!(url.resolve().unwrap(), "127.0.0.1:9000".parse().unwrap());

        let url = Url::parse("ws://localhost", "ws", 80).unwrap();
        assert_eq!((url.port, url.path.as_str()), (80, "/"));
        let url = Url::parse("ws://[::1]:8080/ws", "ws", 80).unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 8080));
        assert_eq!(expand("/ws", "x", 1), "/ws");
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        let secure = Url::parse("wss://x/ws", "ws", 80).unwrap();
        assert!(secure.tls && secure.port == 443);
        assert!(!Url::parse("ws://x/ws", "ws", 80).unwrap().tls);
        assert!(Url::parse("https://x/pub", "http", 80).unwrap_err().contains("TLS"));
        assert!(Url::parse("http://x/ws", "ws", 80).is_err());
        assert!(Url::parse("ws:///ws", "ws", 80).is_err());
        assert!(Url::parse("ws://{n}.example/ws", "ws", 80).is_err());
        assert!(Url::parse("ws://x:99999/ws", "ws", 80).is_err());
        assert!(Url::parse("ws://x/ws/{user}", "ws", 80).unwrap_err().contains("braces"));
        assert!(Url::parse("ws://x/a b", "ws", 80).is_err());
        let publish = Url::parse("http://127.0.0.1:9000/pub/{channel}", "http", 80).unwrap();
        assert_eq!(expand(&publish.path, "news", 0), "/pub/news");
    }

    #[test]
    fn url_lists_repeated_and_comma_separated() {
        let values = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let urls = parse_urls(&values(&["ws://a:1/ws, ws://b:2/ws", "ws://c:3/x/{n}"])).unwrap();
        let hosts: Vec<_> = urls.iter().map(|u| (u.host.as_str(), u.port, u.path.as_str())).collect();
        assert_eq!(hosts, [("a", 1, "/ws"), ("b", 2, "/ws"), ("c", 3, "/x/{n}")]);
        // Duplicates stay: the same node twice gets two shares.
        assert_eq!(parse_urls(&values(&["ws://a/ws", "ws://a/ws"])).unwrap().len(), 2);
        assert_eq!(parse_urls(&values(&["ws://a/ws"])).unwrap(), [Url::parse("ws://a/ws", "ws", 80).unwrap()]);
        assert!(parse_urls(&values(&["ws://a/ws,,ws://b/ws"])).unwrap_err().contains("empty"));
        assert!(parse_urls(&values(&["ws://a/ws,"])).is_err());
        assert!(parse_urls(&[]).is_err());
        // Plain and TLS targets may be mixed (each target has its own).
        let mixed = parse_urls(&values(&["ws://a/ws,wss://b/ws"])).unwrap();
        assert_eq!(mixed.iter().map(|u| (u.tls, u.port)).collect::<Vec<_>>(), [(false, 80), (true, 443)]);
        let many = vec!["ws://a/ws".to_string(); URLS_MAX + 1].join(",");
        assert!(parse_urls(&[many]).unwrap_err().contains("at most"));
    }

    #[test]
    fn source_address_forms() {
        assert_eq!(
            parse_source_addresses("3").unwrap(),
            vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4)]
        );
        let range = parse_source_addresses("127.0.0.2-127.0.0.20").unwrap();
        assert_eq!(range.len(), 19);
        assert_eq!(range[18], Ipv4Addr::new(127, 0, 0, 20));
        let across = parse_source_addresses("127.0.0.255-127.0.1.1").unwrap();
        assert_eq!(
            across,
            vec![Ipv4Addr::new(127, 0, 0, 255), Ipv4Addr::new(127, 0, 1, 0), Ipv4Addr::new(127, 0, 1, 1)]
        );
        let list = parse_source_addresses("10.0.0.1, 127.0.0.5-127.0.0.6").unwrap();
        assert_eq!(list.len(), 3);
        assert!(parse_source_addresses("0").is_err());
        assert!(parse_source_addresses("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_addresses("127.0.0").is_err());
        assert!(parse_source_addresses("").is_err());
        assert!(parse_source_addresses("1.0.0.0-2.0.0.0").is_err());
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration_ms("10").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("10s").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1_500);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("2m").unwrap(), 120_000);
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("-1s").is_err());
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("10".parse::<Rate>().unwrap(), Rate::PerSecond(10.0));
        assert_eq!("2.5/s".parse::<Rate>().unwrap(), Rate::PerSecond(2.5));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }
}
