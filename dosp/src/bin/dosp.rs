//! `dosp` — the DOSP client CLI: store, fetch, range, delete, contents, locate, disks, ping,
//! and minting capability tokens.
//!
//! Output for scripts goes to stdout (a fingerprint alone on its line, object bytes,
//! tables); progress bars and errors go to stderr. Exit status: 0 success, 1 error,
//! 2 usage error, 3 object not found (or nobody holds it).

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use clap::{Parser, Subcommand};
use dosp::auth::{CapOp, Capability, CertMode, KeyRing, Token};
use dosp::client::{
    locate_multicast_signed, watch_signed, Client, ClientError, ClusterEvent, Expect,
};
use dosp::signed::Signer;
use dosp::wire::NodeName;
use dosp::Fingerprint;
use indicatif::{ProgressBar, ProgressStyle};

/// Default DOSP address of a node started with no arguments.
const NODE_DEFAULT: &str = "127.0.0.1:7370";
/// Default cluster multicast group (administratively scoped, RFC 2365).
const GROUP_DEFAULT: &str = "239.255.73.70:7371";
/// Objects at least this large get a progress bar on a terminal.
const PROGRESS_MIN_BYTES: u64 = 8 << 20;

#[derive(Parser, Debug)]
#[command(name = "dosp", version, about = "Client for dosd storage nodes (DOSP)")]
struct Cli {
    /// Node to talk to (HOST:PORT). Also read from $DOSP_NODE.
    #[arg(long, global = true, env = "DOSP_NODE", default_value = NODE_DEFAULT)]
    node: String,
    /// Seconds to wait for the node before giving up.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// Cluster key file (`ID HEXSECRET` a line, the node's format): every request is
    /// signed with its first key, and `watch`/`locate` drop what no key of it signed.
    /// Also read from $DOSP_KEY_FILE.
    #[arg(long, global = true, env = "DOSP_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Certificate mode of signed requests: HMAC-SHA256, or the specification's
    /// double MD5 (accepted only by nodes started with --auth-allow-md5).
    #[arg(long, global = true, value_enum, default_value_t = AuthMode::Hmac)]
    auth_mode: AuthMode,
    /// Capability token (from `dosp token`) to present with every request instead of
    /// signing: needs no key. Cannot be combined with a key file. Also read from
    /// $DOSP_TOKEN.
    #[arg(long, global = true, env = "DOSP_TOKEN", value_name = "TOKEN")]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AuthMode {
    Hmac,
    Md5,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Store FILE (or stdin with `-`); prints the fingerprint. The node is told the
    /// file's length, and refuses (storing nothing) data that does not match it.
    Store {
        file: PathBuf,
        /// The object's MD5 (32 hex digits): the node refuses, and stores nothing of,
        /// data with another
        #[arg(long, value_name = "HEX")]
        md5: Option<String>,
    },
    /// Fetch an object (verified against its fingerprint) to stdout or -o FILE.
    Fetch {
        fingerprint: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Fetch LENGTH bytes at OFFSET of an object.
    Range {
        fingerprint: String,
        offset: u64,
        length: u64,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Drop one reference to an object; prints the references left.
    Delete { fingerprint: String },
    /// List every object the node holds: fingerprint and disk.
    Contents,
    /// Ask the cluster (multicast) who holds an object; prints a line per holder: node
    /// id, name (`-` if it has none), address, disk and length.
    Locate {
        fingerprint: String,
        /// Multicast group (GROUP:PORT).
        #[arg(long, default_value = GROUP_DEFAULT)]
        multicast: SocketAddrV4,
        /// Local interface address for multicast.
        #[arg(long, default_value = "127.0.0.1")]
        multicast_if: Ipv4Addr,
        /// How long to collect answers, in milliseconds.
        #[arg(long, default_value_t = 500)]
        wait_ms: u64,
    },
    /// Print heartbeats, announcements and LOCATE answers heard on the cluster group,
    /// one line each, as they arrive.
    Watch {
        /// Multicast group (GROUP:PORT).
        #[arg(long, default_value = GROUP_DEFAULT)]
        multicast: SocketAddrV4,
        /// Local interface address for multicast.
        #[arg(long, default_value = "127.0.0.1")]
        multicast_if: Ipv4Addr,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        seconds: Option<u64>,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<u64>,
    },
    /// State and status of every disk of the node.
    Disks,
    /// Check the node answers (DOSP NULL); prints the round-trip time and the node's
    /// limits (largest body, STORE chunk and object, in bytes).
    Ping,
    /// Mint a capability token with the key file's first key (needs --key-file or
    /// $DOSP_KEY_FILE); prints the token alone on its line. Whoever holds it may use
    /// it, with `dosp --token`, until it expires.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print a signed URL that fetches one object over HTTP from a node started with
    /// `--http-listen` (dosp/HTTP.md), valid for TTL; needs --key-file or $DOSP_KEY_FILE.
    /// Whoever holds the URL may fetch the object until it expires. With `--auth-mode
    /// md5`, the specification's double-MD5 certificate (only nodes started with
    /// --auth-allow-md5 accept it).
    Url {
        fingerprint: String,
        /// How long the URL is valid: seconds, or a number with s, m, h or d.
        #[arg(long, value_name = "TTL", value_parser = parse_ttl)]
        ttl: u64,
        /// File name a browser saves the object under (the URL's last segment; not
        /// signed). Default: the fingerprint in hex.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Scheme, host and port of the node's HTTP listener; without it only the path
        /// is printed.
        #[arg(long, value_name = "URL")]
        base: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// A token for RETRIEVE and RETRIEVE_RANGE (`fetch`, `range`) of one object.
    Fetch {
        fingerprint: String,
        /// How long the token is valid: seconds, or a number with s, m, h or d.
        #[arg(long, value_name = "TTL", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// A token for STOREs of at most N bytes each.
    Store {
        /// Largest object the token lets its holder store, in bytes.
        #[arg(long, value_name = "N")]
        max_bytes: u64,
        /// How long the token is valid: seconds, or a number with s, m, h or d.
        #[arg(long, value_name = "TTL", value_parser = parse_ttl)]
        ttl: u64,
    },
}

/// A time to live in seconds, from `90`, `90s`, `10m`, `2h` or `1d`.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let (digits, unit_s) = match text.as_bytes().last() {
        Some(b's') => (&text[..text.len() - 1], 1),
        Some(b'm') => (&text[..text.len() - 1], 60),
        Some(b'h') => (&text[..text.len() - 1], 3_600),
        Some(b'd') => (&text[..text.len() - 1], 86_400),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} is not a time to live: seconds, or a number with s, m, h or d (90, 90s, 10m, 2h, 1d)"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_s))
        .ok_or_else(|| format!("{text:?} is too long a time to live"))
}

/// A CLI failure: the message for stderr and the exit code.
struct Failure {
    message: String,
    code: u8,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = if matches!(e, ClientError::NotFound { .. }) {
            3
        } else {
            1
        };
        Failure {
            message: e.to_string(),
            code,
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn parse_fp(s: &str) -> Result<Fingerprint, Failure> {
    s.parse::<Fingerprint>().map_err(|e| Failure {
        message: format!("invalid fingerprint {s:?}: {e}"),
        code: 2,
    })
}

fn bar(total: u64) -> Option<ProgressBar> {
    if total < PROGRESS_MIN_BYTES || !io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(pb)
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: 2,
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let timeout = Duration::from_secs(cli.timeout.max(1));
    if cli.token.is_some() && cli.key_file.is_some() {
        return Err(usage(
            "give either a key file (--key-file, $DOSP_KEY_FILE) or a token (--token, $DOSP_TOKEN), not both",
        ));
    }
    let token = cli
        .token
        .as_deref()
        .map(|text| Token::parse(text.trim()).map_err(|e| usage(format!("invalid --token: {e}"))))
        .transpose()?;
    let signer = match &cli.key_file {
        None => None,
        Some(path) => {
            let ring = KeyRing::load(path)
                .map_err(|e| fail(format!("cannot use key file {}: {e}", path.display())))?;
            let mode = match cli.auth_mode {
                AuthMode::Hmac => CertMode::HmacSha256,
                AuthMode::Md5 => CertMode::DoubleMd5,
            };
            Some(Signer::new(ring, mode))
        }
    };
    let connect = || {
        Client::connect(&cli.node, timeout).map(|mut c| {
            c.set_signer(signer.clone());
            c.set_token(token);
            c
        })
    };
    match cli.cmd {
        Cmd::Token(what) => {
            let Some(signer) = &signer else {
                return Err(usage(
                    "minting a token needs the cluster key: --key-file FILE or $DOSP_KEY_FILE",
                ));
            };
            let (op, ttl_s) = match what {
                TokenCmd::Fetch { fingerprint, ttl } => {
                    (CapOp::Retrieve(parse_fp(&fingerprint)?), ttl)
                }
                TokenCmd::Store { max_bytes, ttl } => (CapOp::Store { max_bytes }, ttl),
            };
            let now_unix_s = dosp::signed::now_ms() / 1000;
            let cap = Capability {
                op,
                expires_unix_s: now_unix_s.saturating_add(ttl_s),
            };
            println!("{}", signer.ring().mint(&cap));
        }
        Cmd::Url {
            fingerprint,
            ttl,
            name,
            base,
        } => {
            let Some(signer) = &signer else {
                return Err(usage(
                    "signing a URL needs the cluster key: --key-file FILE or $DOSP_KEY_FILE",
                ));
            };
            let fingerprint = parse_fp(&fingerprint)?;
            let now_unix_s = dosp::signed::now_ms() / 1000;
            let path = dosp::auth::srl_path_with(
                signer.ring(),
                signer.mode(),
                &fingerprint,
                now_unix_s.saturating_add(ttl),
                name.as_deref(),
            );
            let base = base.as_deref().unwrap_or("");
            println!("{}{path}", base.trim_end_matches('/'));
        }
        Cmd::Store { file, md5 } => {
            let md5 = md5.as_deref().map(parse_fp).transpose()?;
            let (mut input, len): (Box<dyn Read>, Option<u64>) = if file.as_os_str() == "-" {
                (Box::new(io::stdin().lock()), None)
            } else {
                let f = File::open(&file)
                    .map_err(|e| fail(format!("cannot open {}: {e}", file.display())))?;
                // Only a regular file's size is its length (a device or /proc file
                // says 0 or anything).
                let len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
                (Box::new(f), len)
            };
            let mut client = connect()?;
            let pb = bar(len.unwrap_or(0));
            let stored = client.store(&mut input, Expect { len, md5 }, &mut |sent| {
                if let Some(pb) = &pb {
                    pb.set_position(sent);
                }
            })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            println!("{}", stored.fingerprint);
        }
        Cmd::Fetch {
            fingerprint,
            output,
        } => {
            let fp = parse_fp(&fingerprint)?;
            let mut client = connect()?;
            let mut pb: Option<ProgressBar> = None;
            let mut progress = |got: u64, total: u64| {
                if pb.is_none() && got == 0 {
                    return;
                }
                if pb.is_none() {
                    pb = bar(total);
                    if pb.is_none() {
                        return;
                    }
                }
                if let Some(pb) = &pb {
                    pb.set_position(got);
                }
            };
            with_output(output.as_deref(), |out| {
                client.retrieve(&fp, out, &mut progress).map(|_| ())
            })?;
        }
        Cmd::Range {
            fingerprint,
            offset,
            length,
            output,
        } => {
            let fp = parse_fp(&fingerprint)?;
            let mut client = connect()?;
            with_output(output.as_deref(), |out| {
                client.retrieve_range(&fp, offset, length, out).map(|_| ())
            })?;
        }
        Cmd::Delete { fingerprint } => {
            let fp = parse_fp(&fingerprint)?;
            let left = connect()?.delete(&fp)?;
            println!("{left}");
        }
        Cmd::Contents => {
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let mut write_err = None;
            connect()?.contents(&mut |fp, disk| {
                if write_err.is_none() {
                    if let Err(e) = writeln!(out, "{fp} {disk}") {
                        write_err = Some(e);
                    }
                }
            })?;
            if let Some(e) = write_err.or_else(|| out.flush().err()) {
                return Err(fail(format!("cannot write output: {e}")));
            }
        }
        Cmd::Locate {
            fingerprint,
            multicast,
            multicast_if,
            wait_ms,
        } => {
            let fp = parse_fp(&fingerprint)?;
            let (found, dropped) = locate_multicast_signed(
                multicast,
                multicast_if,
                &fp,
                Duration::from_millis(wait_ms),
                signer.as_ref(),
            )?;
            if signer.is_some() {
                eprintln!("dropped {dropped} unsigned or badly signed answers");
            }
            if found.is_empty() {
                return Err(Failure {
                    message: format!(
                        "no node on {multicast} holds object {fp} (waited {wait_ms} ms)"
                    ),
                    code: 3,
                });
            }
            for l in found {
                println!(
                    "node {:016x} name {} addr {} disk {} len {}",
                    l.node_id,
                    name_or_dash(l.name.as_ref()),
                    l.addr,
                    l.disk,
                    l.object_len
                );
            }
        }
        Cmd::Watch {
            multicast,
            multicast_if,
            seconds,
            count,
        } => {
            // "Forever" is a century: the wait is a Duration, and nobody watches longer.
            let wait = Duration::from_secs(seconds.unwrap_or(100 * 365 * 24 * 3600));
            let mut printed = 0u64;
            let stdout = io::stdout();
            let mut out = stdout.lock();
            let mut write_err = None;
            let dropped = watch_signed(
                multicast,
                multicast_if,
                wait,
                signer.as_ref(),
                &mut |event, from| {
                    if let Err(e) =
                        writeln!(out, "{}", describe(&event, from)).and_then(|()| out.flush())
                    {
                        write_err = Some(e);
                        return false;
                    }
                    printed += 1;
                    count.is_none_or(|c| printed < c)
                },
            )?;
            if signer.is_some() {
                eprintln!("dropped {dropped} unsigned or badly signed datagrams");
            }
            if let Some(e) = write_err {
                // A closed pipe (`dosp watch | head`) is a normal way to stop.
                if e.kind() != io::ErrorKind::BrokenPipe {
                    return Err(fail(format!("cannot write output: {e}")));
                }
            }
        }
        Cmd::Disks => {
            let disks = connect()?.disks(dosp::wire::ALL_DISKS)?;
            println!(
                "{:>4} {:<8} {:<32} {:>14} {:>14} {:>14} {:>10} {:>12} {:>5}",
                "disk",
                "state",
                "identity",
                "bytes_total",
                "bytes_free",
                "bytes_avail",
                "objects",
                "objects_avail",
                "ops"
            );
            for d in disks {
                println!(
                    "{:>4} {:<8} {:<32} {:>14} {:>14} {:>14} {:>10} {:>12} {:>5}",
                    d.disk,
                    d.state.map(|s| s.name()).unwrap_or("unknown"),
                    hex::encode(d.identity),
                    d.bytes_total,
                    d.bytes_free,
                    d.bytes_available,
                    d.objects_used,
                    d.objects_available,
                    d.outstanding_ops
                );
            }
        }
        Cmd::Ping => {
            let pong = connect()?.ping()?;
            println!(
                "{} answered in {:.3} ms; limits: body {} chunk {} object {} bytes",
                cli.node,
                pong.rtt.as_secs_f64() * 1e3,
                pong.body_max,
                pong.chunk_max,
                pong.object_max
            );
        }
    }
    Ok(())
}

/// Runs `f` with the output sink: stdout, or a temporary file beside `path` that is
/// renamed into place only once the data is complete and verified, so a failed fetch
/// never leaves a wrong file behind.
fn with_output(
    path: Option<&Path>,
    f: impl FnOnce(&mut dyn Write) -> Result<(), ClientError>,
) -> Result<(), Failure> {
    match path {
        None => {
            let stdout = io::stdout();
            let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
            f(&mut out)?;
            out.flush()
                .map_err(|e| fail(format!("cannot write output: {e}")))?;
        }
        Some(path) => {
            let tmp = path.with_file_name(format!(
                ".{}.dosp-partial",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ));
            let file = File::create(&tmp)
                .map_err(|e| fail(format!("cannot create {}: {e}", tmp.display())))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let result = f(&mut out).map_err(Failure::from).and_then(|()| {
                out.flush()
                    .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
            });
            if let Err(e) = result {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    Ok(())
}

/// A node's name for a line of output, `-` when it has none: every line keeps the same
/// words in the same places for scripts.
fn name_or_dash(name: Option<&NodeName>) -> String {
    name.map_or_else(|| "-".to_string(), NodeName::to_string)
}

/// The name in a wire field, for a line of output.
fn field_name(field: &[u8; dosp::wire::NODE_NAME_MAX]) -> String {
    name_or_dash(NodeName::from_field(field).as_ref())
}

/// One line per cluster event, for `dosp watch`.
fn describe(event: &ClusterEvent, from: std::net::SocketAddr) -> String {
    match event {
        ClusterEvent::Heartbeat(h) => {
            let health = match h.health {
                0 => "ok",
                1 => "degraded",
                _ => "failing",
            };
            format!(
                "heartbeat node {:016x} name {} epoch {} addr {}:{} health {} disks {}/{} objects {} free {} total {} ops {} ops/s {} uptime {}s",
                h.node_id.get(),
                field_name(&h.name),
                h.epoch.get(),
                Ipv4Addr::from(h.addr),
                h.port.get(),
                health,
                h.disks_online.get(),
                h.disks_total.get(),
                h.objects.get(),
                h.bytes_free.get(),
                h.bytes_total.get(),
                h.ops_outstanding.get(),
                h.ops_per_sec.get(),
                h.uptime_ms.get() / 1000
            )
        }
        ClusterEvent::Announce(a) => {
            let kind = dosp::wire::AnnounceKind::from_u8(a.kind)
                .map(|k| k.name())
                .unwrap_or("unknown");
            let disk = if a.disk.get() == dosp::wire::ALL_DISKS {
                "-".to_string()
            } else {
                a.disk.get().to_string()
            };
            format!(
                "announce node {:016x} name {} epoch {} seq {} {} disk {} reason {:?} from {}",
                a.node_id.get(),
                field_name(&a.name),
                a.epoch.get(),
                a.seq.get(),
                kind,
                disk,
                a.reason(),
                from
            )
        }
        ClusterEvent::Located(l) => format!(
            "located {} node {:016x} name {} addr {}:{} disk {} len {}",
            l.fingerprint,
            l.node_id.get(),
            field_name(&l.name),
            Ipv4Addr::from(l.addr),
            l.port.get(),
            l.disk.get(),
            l.object_len.get()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls() {
        for (text, s) in [
            ("90", 90),
            ("90s", 90),
            ("10m", 600),
            ("2h", 7_200),
            ("1d", 86_400),
            ("0", 0),
        ] {
            assert_eq!(parse_ttl(text), Ok(s), "{text}");
        }
        for bad in [
            "",
            "s",
            "m10",
            "1.5h",
            "-1",
            "10 m",
            "1w",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
