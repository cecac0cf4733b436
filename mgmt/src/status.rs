//! The operator's status page at `/`: one self-contained HTML page (its style and
//! script inline, nothing fetched from anywhere but this endpoint) that polls
//! `/v1/node`, `/v1/disks`, `/v1/health` and `/metrics` every second and shows the
//! node, its disks, its health with the reasons, and throughput plots computed in the
//! browser from consecutive `/metrics` counter samples.
//!
//! It is HTML for a person, not part of the API, so it is not in the OpenAPI document.
//! Its Content-Security-Policy allows nothing but the page's own inline script and
//! style (by their SHA-256, computed from the page itself once) and requests back to
//! this endpoint.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The page, as served.
pub const PAGE: &str = include_str!("status.html");

/// Serves the page.
pub(crate) async fn page() -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            // Always the running node's page (the data comes from polling anyway).
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::CONTENT_SECURITY_POLICY, csp().clone()),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        PAGE,
    )
        .into_response()
}

/// The page's Content-Security-Policy: its inline `<script>` and `<style>` by hash,
/// `fetch` to this origin only, no frames, forms, plugins or base URL changes.
pub fn csp() -> &'static HeaderValue {
    static CSP: OnceLock<HeaderValue> = OnceLock::new();
    CSP.get_or_init(|| {
        HeaderValue::from_str(&policy(PAGE))
            // Unreachable (the policy is ASCII); were it not, fail closed.
            .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
    })
}

/// The policy for `page`: every inline script and style element allowed by its hash.
fn policy(page: &str) -> String {
    let hashes = |tag: &str| -> String {
        inline_elements(page, tag)
            .iter()
            .map(|body| format!(" 'sha256-{}'", base64(&Sha256::digest(body.as_bytes()))))
            .collect()
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The text of each `<tag>…</tag>` element of `page` (written without attributes, as
/// the page writes them): what a browser hashes for the policy.
fn inline_elements<'a>(page: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4), as CSP hash sources are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
    use std::time::Duration;

    use crate::{Mgmt, MgmtConfig, Thresholds};
    use dataplane::node::{Addresses, NodeState};

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn policy_hashes_each_inline_script_and_style() {
        let page = "<style>a{}</style><p>x</p><script>1</script><script>2</script>";
        assert_eq!(inline_elements(page, "script"), ["1", "2"]);
        assert_eq!(inline_elements(page, "style"), ["a{}"]);
        let p = policy(page);
        // SHA-256 of "1", in base64 (as `printf 1 | sha256sum` gives it in hex).
        assert!(
            p.contains("'sha256-a4ayc/80/OGda4BO/1o/V0etpOqiLx1JwB5S3beHW0s='"),
            "{p}"
        );
        assert_eq!(p.matches("'sha256-").count(), 3, "{p}");
        assert!(p.starts_with("default-src 'none'; "), "{p}");
        assert!(!p.contains("unsafe"), "{p}");
    }

    #[test]
    fn the_page_needs_nothing_the_policy_forbids() {
        // One script and one style, both inline and hashed: no `src=`/`href=` to
        // another origin, no inline event handlers or style attributes (the hashes
        // do not cover those), no markup built from strings.
        assert_eq!(inline_elements(PAGE, "script").len(), 1);
        assert_eq!(inline_elements(PAGE, "style").len(), 1);
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        for forbidden in [
            "http://",
            "https://",
            "src=",
            " style=",
            " onclick",
            " onload",
            "innerHTML",
            "eval(",
        ] {
            let found = PAGE
                .match_indices(forbidden)
                // The SVG namespace is a name, not a resource.
                .filter(|(i, _)| !PAGE[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(found, 0, "the page contains {forbidden:?}");
        }
        for landmark in [
            "<html lang=\"en\">",
            "<meta name=\"viewport\"",
            "<header>",
            "<main ",
            "<footer>",
            "id=\"health-status\"",
            "id=\"node-id\"",
            "id=\"plots\"",
            "id=\"disk-list\"",
            "id=\"conn\"",
        ] {
            assert!(PAGE.contains(landmark), "the page lacks {landmark}");
        }
    }

    /// `GET path` over a fresh connection; the whole response.
    fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    }

    #[test]
    fn root_serves_the_page_with_its_headers() {
        let (handle, _end) = dataplane::handle::handle_pair();
        let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let node = NodeState::new(
            0x1234,
            None,
            1,
            Addresses {
                dosp: any,
                multicast_group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 0, 1), 7371),
                multicast_if: Ipv4Addr::LOCALHOST,
                mgmt: None,
            },
        );
        let cfg = MgmtConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            network_backend: "kernel".into(),
            token: None,
            thresholds: Thresholds::default(),
            command_wait: Duration::from_secs(1),
            boot: None,
            restarts_file: None,
        };
        let mgmt = Mgmt::start(cfg, handle, node).unwrap();
        let addr = mgmt.local_addr();

        let raw = get(addr, "GET", "/");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert!(
            head.contains("\r\ncontent-type: text/html; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\ncache-control: no-store\r\n"), "{head}");
        assert!(
            head.contains("\r\nx-content-type-options: nosniff\r\n"),
            "{head}"
        );
        let csp_line = head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .expect("a Content-Security-Policy header");
        assert_eq!(csp_line, csp().to_str().unwrap().to_ascii_lowercase());
        assert!(csp_line.contains("script-src 'sha256-"), "{csp_line}");
        assert!(csp_line.contains("connect-src 'self'"), "{csp_line}");
        assert_eq!(body, PAGE);
        for landmark in [
            "<main ",
            "<header>",
            "<footer>",
            "<h2 id=\"disks-h\">Disks</h2>",
        ] {
            assert!(body.contains(landmark), "no {landmark}");
        }

        // HEAD answers the same headers without the body.
        let raw = get(addr, "HEAD", "/");
        assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
        assert!(raw.ends_with("\r\n\r\n"), "{raw}");
        // The API beside it is unchanged: JSON, and JSON errors for unknown paths.
        let raw = get(addr, "GET", "/v1/node");
        assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
        assert!(raw.contains("\"node_id\":\"0000000000001234\""), "{raw}");
        let raw = get(addr, "GET", "/index.html");
        assert!(raw.starts_with("HTTP/1.1 404 "), "{raw}");
        assert!(raw
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        let raw = get(addr, "POST", "/");
        assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");
        mgmt.stop();
    }
}
