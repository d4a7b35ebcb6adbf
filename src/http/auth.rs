//! Who may change a running instance. Requests that change something (every method but GET,
//! HEAD and OPTIONS: a savepoint, a stop, a deletion) must not come from another site's page
//! (`Sec-Fetch-Site`, `Origin`) and, when `http.admin_token_file` names a token, must carry it
//! as `Authorization: Bearer <token>`, compared in constant time. Reading is open to all.
//! [`authorize`] decides from the request's headers alone; [`AdminToken::load`] reads the file.

use std::path::Path;

use axum::http::uri::Authority;
use axum::http::{header, HeaderMap, Method};
use subtle::ConstantTimeEq;

use super::HttpError;
use crate::config::HttpSettings;

/// The admin token, as read from `http.admin_token_file`; never printed.
#[derive(Clone)]
pub struct AdminToken(Vec<u8>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// The fewest characters a token may have.
pub const MIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    /// The token of `text` (surrounding whitespace, such as the newline `echo` and secret
    /// tools leave, is not part of it).
    pub fn parse(text: &str) -> Result<AdminToken, String> {
        let token = text.trim();
        if token.chars().count() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token has {} characters, fewer than {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32` makes one)",
                token.chars().count()
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the token contains whitespace or control characters".into());
        }
        Ok(AdminToken(token.as_bytes().to_vec()))
    }

    /// Reads the token from `path`.
    pub fn read(path: &Path) -> Result<AdminToken, HttpError> {
        let text = std::fs::read_to_string(path).map_err(|source| HttpError::TokenFile {
            path: path.to_path_buf(),
            source,
        })?;
        AdminToken::parse(&text).map_err(|reason| HttpError::BadToken {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// The token `http.admin_token_file` names, if it names one.
    pub fn load(http: &HttpSettings) -> Result<Option<AdminToken>, HttpError> {
        http.admin_token_file
            .as_deref()
            .map(AdminToken::read)
            .transpose()
    }

    /// The value of an `Authorization` header carrying the token.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    fn matches(&self, given: &[u8]) -> bool {
        bool::from(self.0.as_slice().ct_eq(given))
    }
}

/// Why a request that changes something was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Sent by a page of another site (the browser says so).
    CrossSite(String),
    /// No `Authorization: Bearer` header, while a token is configured.
    MissingToken,
    /// A token other than the configured one.
    WrongToken,
}

impl Denied {
    /// Every label of [`Denied::label`].
    pub const LABELS: [&'static str; 3] = ["cross_site", "missing_token", "wrong_token"];

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Denied::CrossSite(_) => "cross_site",
            Denied::MissingToken => "missing_token",
            Denied::WrongToken => "wrong_token",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::CrossSite(why) => write!(f, "refused: a cross-site request ({why})"),
            Denied::MissingToken => f.write_str(
                "refused: this instance requires `Authorization: Bearer <token>` (http.admin_token_file) for requests that change it",
            ),
            Denied::WrongToken => f.write_str("refused: wrong admin token"),
        }
    }
}

/// Whether `method` only reads.
pub fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether a request that changes something, with these headers, may go ahead.
pub fn authorize(headers: &HeaderMap, token: Option<&AdminToken>) -> Result<(), Denied> {
    cross_site(headers).map_or(Ok(()), |why| Err(Denied::CrossSite(why)))?;
    let Some(token) = token else {
        // without a token, the instance must be addressed by an IP address or `localhost`:
        // a page of another site can point a name of its own at this host (DNS rebinding),
        // and its requests are then same-origin
        return match host_by_name(headers) {
            Some(name) => Err(Denied::CrossSite(format!(
                "addressed as {name}: without an admin token, address the instance by IP address or localhost"
            ))),
            None => Ok(()),
        };
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_value(v.as_bytes()))
        .ok_or(Denied::MissingToken)?;
    if token.matches(given) {
        Ok(())
    } else {
        Err(Denied::WrongToken)
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer_value(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    (value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme))
        .then(|| value[scheme.len()..].trim_ascii())
}

/// The `Host` of the request when it is a name other than `localhost` (an IP address, or no
/// `Host` at all, gives `None`).
fn host_by_name(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(header::HOST)?.to_str().unwrap_or("(not text)");
    let literal = raw.parse::<Authority>().is_ok_and(|a| {
        let host = a.host().trim_start_matches('[').trim_end_matches(']');
        host.parse::<std::net::IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost")
    });
    (!literal).then(|| raw.to_string())
}

/// Why the request comes from another site's page, if it does. Browsers say where a request
/// comes from (`Sec-Fetch-Site`; `Origin` on every POST and DELETE); other clients (the CLI,
/// curl, Kubernetes) send neither.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)"))
    };
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = text("origin")?;
    let host = text("host");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => None,
        _ => Some(format!(
            "Origin {origin} is not this instance ({})",
            host.unwrap_or("no Host header")
        )),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, Method};

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header value"));
        }
        h
    }

    fn token() -> AdminToken {
        AdminToken::parse(TOKEN).expect("token")
    }

    #[test]
    fn the_configured_token_lets_a_request_through_and_nothing_else_does() {
        let t = token();
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            authorize(&headers(&[("authorization", &bearer)]), Some(&t)),
            Ok(())
        );
        // the scheme in any case, as HTTP allows
        let lower = format!("bearer {TOKEN}");
        assert_eq!(
            authorize(&headers(&[("authorization", &lower)]), Some(&t)),
            Ok(())
        );
        assert_eq!(
            authorize(&headers(&[]), Some(&t)),
            Err(Denied::MissingToken)
        );
        for wrong in [
            "Bearer 0123456789abcdef012",
            "Bearer 0123456789abcdef01234",
            "Bearer 0123456789abcdef0124",
            "Bearer ",
        ] {
            let got = authorize(&headers(&[("authorization", wrong)]), Some(&t));
            assert!(
                matches!(got, Err(Denied::WrongToken | Denied::MissingToken)),
                "{wrong}: {got:?}"
            );
        }
        // the token sent as another scheme's credentials
        let basic = format!("Basic {TOKEN}");
        assert_eq!(
            authorize(&headers(&[("authorization", &basic)]), Some(&t)),
            Err(Denied::MissingToken)
        );
    }

    #[test]
    fn without_a_token_configured_only_cross_site_requests_are_refused() {
        assert_eq!(authorize(&headers(&[]), None), Ok(()));
        assert_eq!(
            authorize(
                &headers(&[
                    ("origin", "http://127.0.0.1:9180"),
                    ("host", "127.0.0.1:9180")
                ]),
                None
            ),
            Ok(())
        );
        for cross in [
            headers(&[
                ("origin", "https://evil.example"),
                ("host", "127.0.0.1:9180"),
            ]),
            headers(&[("origin", "null"), ("host", "127.0.0.1:9180")]),
            // another port of the same host is another origin
            headers(&[
                ("origin", "http://127.0.0.1:3000"),
                ("host", "127.0.0.1:9180"),
            ]),
            headers(&[("origin", "http://127.0.0.1:9180")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
        ] {
            let got = authorize(&cross, None);
            assert!(
                matches!(got, Err(Denied::CrossSite(_))),
                "{cross:?}: {got:?}"
            );
        }
        assert_eq!(
            authorize(&headers(&[("sec-fetch-site", "same-origin")]), None),
            Ok(())
        );
    }

    #[test]
    fn without_a_token_the_instance_must_be_addressed_by_ip_address_or_localhost() {
        for host in [
            "127.0.0.1:9180",
            "localhost:9180",
            "LOCALHOST",
            "[::1]:9180",
            "10.0.0.7",
        ] {
            assert_eq!(
                authorize(&headers(&[("host", host)]), None),
                Ok(()),
                "{host}"
            );
        }
        // a name a page's site controls, pointed at this host (DNS rebinding): its requests
        // are same-origin for the browser
        for host in [
            "rebind.attacker.example:9180",
            "checkpointer",
            "[not-v6]:9180",
        ] {
            let rebound = headers(&[
                ("host", host),
                ("origin", &format!("http://{host}")),
                ("sec-fetch-site", "same-origin"),
            ]);
            let got = authorize(&rebound, None);
            assert!(matches!(got, Err(Denied::CrossSite(_))), "{host}: {got:?}");
        }
        // with a token the name does not matter: the token decides
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            authorize(
                &headers(&[
                    ("host", "checkpointer-0.checkpointer:9180"),
                    ("authorization", &bearer)
                ]),
                Some(&token())
            ),
            Ok(())
        );
    }

    #[test]
    fn a_cross_site_request_is_refused_even_with_the_token() {
        let bearer = format!("Bearer {TOKEN}");
        let got = authorize(
            &headers(&[
                ("authorization", &bearer),
                ("origin", "https://evil.example"),
                ("host", "127.0.0.1:9180"),
            ]),
            Some(&token()),
        );
        assert!(matches!(got, Err(Denied::CrossSite(_))), "{got:?}");
    }

    #[test]
    fn tokens_are_trimmed_and_short_or_spaced_ones_refused() {
        let t = AdminToken::parse(&format!("  {TOKEN}\n")).expect("trimmed");
        assert!(t.matches(TOKEN.as_bytes()));
        assert!(AdminToken::parse("short").is_err());
        assert!(AdminToken::parse("").is_err());
        assert!(AdminToken::parse("0123456789 abcdef0123").is_err());
        assert_eq!(format!("{t:?}"), "AdminToken(***)");
    }

    #[test]
    fn only_requests_that_read_are_open() {
        assert!(reads_only(&Method::GET));
        assert!(reads_only(&Method::HEAD));
        assert!(!reads_only(&Method::POST));
        assert!(!reads_only(&Method::DELETE));
        assert!(!reads_only(&Method::PUT));
    }
}
