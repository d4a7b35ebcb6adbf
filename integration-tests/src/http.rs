//! A minimal HTTP/1.1 client over `std::net::TcpStream`: GET for `/readyz`, `/metrics` and the
//! JSON API, POST and DELETE (empty bodies) for the admin commands.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Status and body of a response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body parsed as JSON; the error shows status and body.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_str(&self.body).map_err(|err| {
            invalid(format!(
                "status {} body is not JSON ({err}): {:?}",
                self.status, self.body
            ))
        })
    }
}

/// The per-operation timeout the harness uses for the service's admin API.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` with [`TIMEOUT`]; `None` when nothing answers or the answer is not HTTP (a service
/// still starting, or gone), for tests that poll.
pub fn try_get(addr: SocketAddr, path: &str) -> Option<Response> {
    get(addr, path, TIMEOUT).ok()
}

/// `GET path` on `addr` with `Connection: close`; the whole exchange is bounded by `timeout`
/// per socket operation.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    request(addr, "GET", path, timeout)
}

/// `POST path` with an empty body (`Content-Length: 0`); otherwise like [`get`].
pub fn post(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    request(addr, "POST", path, timeout)
}

/// `DELETE path` with an empty body (`Content-Length: 0`); otherwise like [`get`].
pub fn delete(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    request(addr, "DELETE", path, timeout)
}

/// `METHOD path` with more request headers (`name`, `value`); otherwise like [`get`].
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Response> {
    request_with(addr, method, path, headers, timeout)
}

fn request(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> io::Result<Response> {
    request_with(addr, method, path, &[], timeout)
}

fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body_header = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let more: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    // the address, unless the caller names the host itself
    let host = if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{host}Accept: */*\r\n{body_header}{more}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err(invalid("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_body() {
        let r =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nno\n")
                .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "no\n");
    }

    #[test]
    fn parses_chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "hello, world");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"nonsense").is_err());
    }
}
