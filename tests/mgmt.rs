//! The management REST API of a real `dosd` process: every endpoint, each real response
//! validated against the `/openapi.json` the node serves, disk offline/online with
//! objects, the bearer token, and JSON errors for bad requests.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use dosp::client::ClientError;
use dosp::wire::Status;
use dosp::Fingerprint;
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789";

/// One HTTP exchange's result.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A minimal HTTP/1.1 client: one request per connection (Connection: close), so the
/// response ends where the stream does.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get(node: &Node, path: &str) -> Resp {
    http(node.mgmt, "GET", path, &[], b"")
}

fn post(node: &Node, path: &str, token: Option<&str>, body: &[u8]) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    http(node.mgmt, "POST", path, &headers, body)
}

/// The node's OpenAPI document, made strict: objects may not carry properties the
/// document does not list, so an undocumented field fails validation too.
struct Api {
    doc: Value,
    components: Value,
}

fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

impl Api {
    fn fetch(node: &Node) -> Api {
        let r = get(node, "/openapi.json");
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        let doc = r.json();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        let mut components = doc["components"].clone();
        close_objects(&mut components);
        Api { doc, components }
    }

    /// What is wrong with `body` under `schema` (empty: it conforms).
    fn schema_errors(&self, schema: &Value, body: &Value, what: &str) -> Vec<String> {
        // The schema's `$ref`s point into `#/components`: give them a root to resolve in.
        let mut root = schema.clone();
        root.as_object_mut()
            .expect("schema is an object")
            .insert("components".into(), self.components.clone());
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("{what}: schema does not compile: {e}\n{root}"));
        validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    fn check_schema(&self, schema: &Value, resp: &Resp, what: &str) -> Value {
        let body = resp.json();
        let errors = self.schema_errors(schema, &body, what);
        assert!(
            errors.is_empty(),
            "{what}: response does not match the document: {errors:?}\n{body:#}"
        );
        body
    }

    /// Validates a real response against what the document says `method template`
    /// answers with this status; returns the body as JSON.
    fn check(&self, method: &str, template: &str, resp: &Resp) -> Value {
        let what = format!("{method} {template} -> {}", resp.status);
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{what}: operation not in the document");
        let documented = &op["responses"][resp.status.to_string()];
        assert!(
            documented.is_object(),
            "{what}: status not documented: {}",
            resp.body
        );
        let schema = &documented["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{what}: no JSON schema documented");
        assert!(
            resp.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "{what}: content-type {:?}",
            resp.header("content-type")
        );
        self.check_schema(schema, resp, &what)
    }

    /// Validates an error response (any path, documented or not) against ErrorBody.
    fn check_error(&self, resp: &Resp, status: u16) -> String {
        assert_eq!(resp.status, status, "{}", resp.body);
        assert!(
            resp.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "error without a JSON content-type: {resp:?}"
        );
        let schema = serde_json::json!({"$ref": "#/components/schemas/ErrorBody"});
        let body = self.check_schema(&schema, resp, &format!("error {status}"));
        let msg = body["error"].as_str().unwrap().to_string();
        assert!(!msg.is_empty());
        msg
    }
}

/// Prometheus samples: name{labels} → value; asserts every sample's family is typed.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.rsplit_once(' ').expect("sample has a value");
        let mut name = key.split('{').next().unwrap();
        // A histogram's samples carry suffixes; its TYPE line has the bare name.
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if text.contains(&format!("# TYPE {base} histogram\n")) {
                    name = base;
                }
            }
        }
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE line for {name}"
        );
        out.insert(key.to_string(), value.parse().expect("numeric value"));
    }
    out
}

fn start(dir: &tempfile::TempDir, extra: &[&str]) -> Node {
    Node::start(&dir.path().join("data"), &unique_group(), extra)
}

#[test]
fn every_endpoint_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, &["--mgmt-token", TOKEN]);
    let api = Api::fetch(&node);
    for path in [
        "/v1/node",
        "/v1/disks",
        "/v1/disks/{id}",
        "/v1/disks/{id}/offline",
        "/v1/disks/{id}/online",
        "/v1/addresses",
        "/v1/addresses/{addr}",
        "/v1/health",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            api.doc["paths"][path].is_object(),
            "{path} missing from the document"
        );
    }
    assert!(api.doc["components"]["securitySchemes"]["bearer"].is_object());
    // The kernel backend owns no addresses: it says so, and refuses to add one (the
    // DPDK backend's service addresses are tested in tests/net_dpdk.rs).
    let a = api.check("GET", "/v1/addresses", &get(&node, "/v1/addresses"));
    assert_eq!(a, serde_json::json!({"managed": false, "addresses": []}));
    let r = post(
        &node,
        "/v1/addresses",
        Some(TOKEN),
        br#"{"addr": "10.0.0.9/24"}"#,
    );
    assert!(api.check_error(&r, 409).contains("ip addr"));
    let r = post(&node, "/v1/addresses", None, br#"{"addr": "10.0.0.9/24"}"#);
    api.check_error(&r, 401);
    let r = post(
        &node,
        "/v1/addresses",
        Some(TOKEN),
        br#"{"addr": "10.0.0.9"}"#,
    );
    api.check_error(&r, 400);
    let stored = node.client().store_bytes(b"counted").unwrap();
    let mut back = Vec::new();
    node.client()
        .retrieve(&stored.fingerprint, &mut back, &mut |_, _| {})
        .unwrap();
    // One reply with an error status, for the errors-by-status counters.
    match node
        .client()
        .retrieve(&Fingerprint::of(b"never stored"), &mut back, &mut |_, _| {})
    {
        Err(ClientError::NotFound { .. }) => {}
        other => panic!("retrieve of a missing object: {other:?}"),
    }
    // The dataplane republishes its disk reports every 250 ms: wait (bounded) for the
    // store to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !get(&node, "/metrics")
        .body
        .contains("dosd_disk_objects_used{disk=\"0\"} 1")
        && !get(&node, "/metrics")
            .body
            .contains("dosd_disk_objects_used{disk=\"1\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the store never showed in the disk reports"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let n = api.check("GET", "/v1/node", &get(&node, "/v1/node"));
    assert_eq!(n["node_id"], node.node_id.as_str());
    assert_eq!(n["epoch"], 1);
    assert_eq!(n["role"], "standalone");
    assert_eq!(n["addresses"]["dosp"], node.addr.to_string().as_str());
    assert_eq!(n["addresses"]["mgmt"], node.mgmt.to_string().as_str());
    assert_eq!(n["addresses"]["multicast_group"], node.group.as_str());
    assert_eq!(n["backends"]["disks"], serde_json::json!(["file"]));
    assert_eq!(n["mutations_enabled"], true);
    assert_eq!(n["restarts"], serde_json::json!({"total": 0, "recent": []}));

    let d = api.check("GET", "/v1/disks", &get(&node, "/v1/disks"));
    let disks = d["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (i, disk) in disks.iter().enumerate() {
        assert_eq!(disk["id"], i);
        assert_eq!(disk["state"], "online");
        // The log space: the 64 MiB image less the label's first MiB, carved for
        // one loop.
        assert_eq!(disk["bytes_total"], 63u64 << 20);
        assert_eq!(disk["identity"].as_str().unwrap().len(), 32);
        assert!(disk["location"].as_str().unwrap().contains("disk"));
        // Opening read the superblocks and started a new epoch (a superblock write and
        // its flush): every disk has done I/O, and none has failed.
        assert!(disk["read_ops"].as_u64().unwrap() >= 1, "{disk}");
        assert!(disk["read_bytes"].as_u64().unwrap() >= 4096, "{disk}");
        assert!(disk["write_ops"].as_u64().unwrap() >= 1, "{disk}");
        assert!(disk["flushes"].as_u64().unwrap() >= 1, "{disk}");
        assert_eq!(disk["errors"], 0);
        assert_eq!(disk["last_error"], Value::Null);
        assert_eq!(disk["corrupt_objects"], 0);
        assert_eq!(disk["corrupt_blocks"], 0);
        // The file backend has no health log: reported as null, not made up.
        assert_eq!(disk["health"], Value::Null);
    }
    let objects: u64 = disks
        .iter()
        .map(|d| d["objects_used"].as_u64().unwrap())
        .sum();
    assert_eq!(objects, 1);
    // The disk that holds the object wrote at least its bytes.
    let holder = disks
        .iter()
        .find(|d| d["objects_used"] == 1)
        .expect("a disk holds the object");
    assert!(holder["write_bytes"].as_u64().unwrap() >= b"counted".len() as u64);
    let one = api.check("GET", "/v1/disks/{id}", &get(&node, "/v1/disks/1"));
    // The I/O counters may move between the two requests (idle-time checkpoints):
    // compare everything else.
    let without_io = |d: &Value| {
        let mut d = d.clone();
        for k in [
            "read_ops",
            "read_bytes",
            "write_ops",
            "write_bytes",
            "flushes",
        ] {
            d.as_object_mut().unwrap().remove(k);
        }
        d
    };
    assert_eq!(without_io(&one), without_io(&disks[1]));

    let h = api.check("GET", "/v1/health", &get(&node, "/v1/health"));
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["reasons"], serde_json::json!([]));
    assert_eq!(h["thresholds"]["disks_down_max"], 1);
    assert_eq!(h["thresholds"]["dataplane_stall_ms"], 2000);
    assert_eq!(h["disks_online"], 2);

    let m = get(&node, "/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let s = samples(&m.body);
    assert!(s["dosd_stores_total"] >= 1.0);
    assert!(s["dosd_loop_turns_total"] >= 1.0);
    for disk in ["0", "1"] {
        assert_eq!(
            s[&format!("dosd_disk_bytes_total{{disk=\"{disk}\"}}")],
            (63u64 << 20) as f64
        );
        assert_eq!(
            s[&format!("dosd_disk_state{{disk=\"{disk}\",state=\"online\"}}")],
            1.0
        );
    }
    let used: f64 = ["0", "1"]
        .iter()
        .map(|d| s[&format!("dosd_disk_objects_used{{disk=\"{d}\"}}")])
        .sum();
    assert_eq!(used, 1.0);
    // Replies by status and latency histograms per class of operation.
    assert!(s["dosd_errors_total"] >= 1.0);
    assert_eq!(s["dosd_errors_by_status_total{status=\"NOT_FOUND\"}"], 1.0);
    assert_eq!(
        s["dosd_errors_by_status_total{status=\"DISK_FAILED\"}"],
        0.0
    );
    assert_eq!(s["dosd_op_latency_seconds_count{op=\"store\"}"], 1.0);
    assert_eq!(s["dosd_op_latency_seconds_count{op=\"retrieve\"}"], 2.0);
    for op in ["store", "retrieve", "delete", "other"] {
        let count = s[&format!("dosd_op_latency_seconds_count{{op=\"{op}\"}}")];
        assert_eq!(
            s[&format!("dosd_op_latency_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}}")],
            count
        );
        assert!(s[&format!("dosd_op_latency_seconds_sum{{op=\"{op}\"}}")] >= 0.0);
    }
    // A request on loopback takes well under 16 s: all in a finite bucket.
    assert_eq!(
        s["dosd_op_latency_seconds_bucket{op=\"store\",le=\"16.777216\"}"],
        1.0
    );
    // Per-disk I/O counters, one sample per disk, and no error yet.
    for disk in ["0", "1"] {
        for family in [
            "dosd_disk_reads_completed_total",
            "dosd_disk_read_bytes_total",
            "dosd_disk_writes_completed_total",
            "dosd_disk_written_bytes_total",
            "dosd_disk_flushes_completed_total",
        ] {
            let v = s[&format!("{family}{{disk=\"{disk}\"}}")];
            assert!(v >= 1.0, "{family} of disk {disk} is {v}");
        }
        assert_eq!(
            s[&format!("dosd_disk_errors_total{{disk=\"{disk}\"}}")],
            0.0
        );
        assert_eq!(
            s[&format!("dosd_disk_last_error_timestamp_seconds{{disk=\"{disk}\"}}")],
            0.0
        );
        for family in [
            "dosd_disk_corrupt_objects",
            "dosd_disk_corrupt_blocks_total",
        ] {
            assert_eq!(s[&format!("{family}{{disk=\"{disk}\"}}")], 0.0, "{family}");
        }
    }

    // HEAD works wherever GET does.
    assert_eq!(http(node.mgmt, "HEAD", "/v1/health", &[], b"").status, 200);
}

/// The validation above is a real one: it rejects what the document does not allow.
#[test]
fn the_validation_rejects_what_the_document_does_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, &[]);
    let api = Api::fetch(&node);
    let schema = serde_json::json!({"$ref": "#/components/schemas/DiskView"});
    let good = get(&node, "/v1/disks/0").json();
    assert!(api.schema_errors(&schema, &good, "good").is_empty());
    let mut bad = Vec::new();
    let mut extra = good.clone();
    extra["surprise"] = 1.into();
    bad.push(extra);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("bytes_free");
    bad.push(missing);
    let mut wrong_type = good.clone();
    wrong_type["objects_used"] = "many".into();
    bad.push(wrong_type);
    let mut wrong_state = good.clone();
    wrong_state["state"] = "sleepy".into();
    bad.push(wrong_state);
    // `last_error` and `health` are always present, null or an object of their shape.
    let mut no_health = good.clone();
    no_health.as_object_mut().unwrap().remove("health");
    bad.push(no_health);
    let mut no_last_error = good.clone();
    no_last_error.as_object_mut().unwrap().remove("last_error");
    bad.push(no_last_error);
    let mut fake_health = good.clone();
    fake_health["health"] = "fine".into();
    bad.push(fake_health);
    let mut bad_error = good.clone();
    bad_error["last_error"] = serde_json::json!({"message": "boom"});
    bad.push(bad_error);
    // While a well-formed last error passes.
    let mut with_error = good.clone();
    with_error["last_error"] = serde_json::json!({"message": "boom", "at_unix_ms": 1});
    assert!(api
        .schema_errors(&schema, &with_error, "with error")
        .is_empty());
    for (i, body) in bad.iter().enumerate() {
        assert!(
            !api.schema_errors(&schema, body, "bad").is_empty(),
            "case {i} passed validation: {body}"
        );
    }
}

#[test]
fn offline_sends_stores_elsewhere_and_online_brings_every_object_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, &["--mgmt-token", TOKEN]);
    let api = Api::fetch(&node);
    let mut client = node.client();
    let objects: Vec<(Fingerprint, Vec<u8>)> = (0..12)
        .map(|i| {
            let bytes = data(100 + i, 1000 + 7919 * i as usize);
            let stored = client.store_bytes(&bytes).unwrap();
            (stored.fingerprint, bytes)
        })
        .collect();
    let where_is = |client: &mut dosp::client::Client| {
        let mut map = HashMap::new();
        client
            .contents(&mut |fp, disk| {
                map.insert(fp, disk);
            })
            .unwrap();
        map
    };
    let before = where_is(&mut client);
    let target = before[&objects[0].0];
    let other = 1 - target;
    let on_target: Vec<&(Fingerprint, Vec<u8>)> = objects
        .iter()
        .filter(|(fp, _)| before[fp] == target)
        .collect();

    let r = post(
        &node,
        &format!("/v1/disks/{target}/offline"),
        Some(TOKEN),
        br#"{"reason":"test"}"#,
    );
    let d = api.check("POST", "/v1/disks/{id}/offline", &r);
    assert_eq!(d["state"], "offline");
    assert_eq!(d["id"], target);
    // Offline again is not an error: the disk simply stays offline. A JSON `null`
    // body is no body, as the document allows.
    let r = post(
        &node,
        &format!("/v1/disks/{target}/offline"),
        Some(TOKEN),
        b"null",
    );
    assert_eq!(
        api.check("POST", "/v1/disks/{id}/offline", &r)["state"],
        "offline"
    );

    let g = api.check(
        "GET",
        "/v1/disks/{id}",
        &get(&node, &format!("/v1/disks/{target}")),
    );
    assert_eq!(g["state"], "offline");
    let h = api.check("GET", "/v1/health", &get(&node, "/v1/health"));
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["reasons"][0]["kind"], "disk_offline");
    assert_eq!(h["reasons"][0]["disk"], target);
    let s = samples(&get(&node, "/metrics").body);
    assert_eq!(
        s[&format!("dosd_disk_state{{disk=\"{target}\",state=\"offline\"}}")],
        1.0
    );

    // Objects on the offline disk are unavailable, with the reason; the others fetch.
    for (fp, bytes) in &objects {
        let mut out = Vec::new();
        let r = client.retrieve(fp, &mut out, &mut |_, _| {});
        if before[fp] == target {
            match r {
                Err(ClientError::Status { status, .. }) => assert_eq!(status, Status::DiskOffline),
                other => panic!("object on the offline disk: {other:?}"),
            }
        } else {
            r.unwrap();
            assert_eq!(&out, bytes);
        }
    }
    // New objects land on the disk still online.
    let fresh: Vec<(Fingerprint, Vec<u8>)> = (0..6)
        .map(|i| {
            let bytes = data(500 + i, 3000 + 13 * i as usize);
            let stored = client.store_bytes(&bytes).unwrap();
            assert_eq!(stored.disk, other, "a STORE landed on the offline disk");
            (stored.fingerprint, bytes)
        })
        .collect();
    let during = where_is(&mut client);
    for (fp, _) in &fresh {
        assert_eq!(during[fp], other);
    }

    let r = post(
        &node,
        &format!("/v1/disks/{target}/online"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(
        api.check("POST", "/v1/disks/{id}/online", &r)["state"],
        "online"
    );
    let h = api.check("GET", "/v1/health", &get(&node, "/v1/health"));
    assert_eq!(h["status"], "ok", "{h}");
    // Every object, old and new, fetches intact (the client checks each against its
    // fingerprint as well), and sits where it was.
    for (fp, bytes) in objects.iter().chain(&fresh) {
        let mut out = Vec::new();
        client.retrieve(fp, &mut out, &mut |_, _| {}).unwrap();
        assert_eq!(&out, bytes);
    }
    assert!(!on_target.is_empty());
    let after = where_is(&mut client);
    for (fp, _) in &objects {
        assert_eq!(after[fp], before[fp]);
    }
}

/// The appliance's init records each run of dosd that ended in `<data dir>/restarts`;
/// the next run reports them in `/v1/node` (a line it cannot read is counted, not shown)
/// and says so in its log.
#[test]
fn node_reports_the_supervisors_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("restarts"),
        "31.50 exit=1 ran=3s\nnot a line\n40.25 exit=unknown ran=7s\n",
    )
    .unwrap();
    let node = Node::start(&data, &unique_group(), &[]);
    let api = Api::fetch(&node);
    let n = api.check("GET", "/v1/node", &get(&node, "/v1/node"));
    assert_eq!(
        n["restarts"],
        serde_json::json!({"total": 3, "recent": [
            {"at_uptime_s": 31.5, "exit": "1", "ran_s": 3},
            {"at_uptime_s": 40.25, "exit": "unknown", "ran_s": 7},
        ]})
    );
    assert!(node
        .log()
        .contains("dosd was restarted by its supervisor after an earlier run ended"));
}

#[test]
fn mutations_need_the_configured_token() {
    let dir = tempfile::tempdir().unwrap();
    // No token configured: mutations are disabled, and the node said so at start-up.
    let open = start(&dir, &[]);
    let api = Api::fetch(&open);
    let r = post(&open, "/v1/disks/0/offline", Some(TOKEN), b"");
    api.check("POST", "/v1/disks/{id}/offline", &r);
    let msg = api.check_error(&r, 403);
    assert!(msg.contains("--mgmt-token"), "{msg}");
    assert_eq!(post(&open, "/v1/disks/0/online", None, b"").status, 403);
    let n = api.check("GET", "/v1/node", &get(&open, "/v1/node"));
    assert_eq!(n["mutations_enabled"], false);
    assert!(open
        .log()
        .contains("POST endpoints (disk offline/online) are disabled"));
    let d = api.check("GET", "/v1/disks/{id}", &get(&open, "/v1/disks/0"));
    assert_eq!(d["state"], "online", "a refused request changed nothing");

    let dir2 = tempfile::tempdir().unwrap();
    let guarded = start(&dir2, &["--mgmt-token", TOKEN]);
    for (auth, why) in [
        (None, "no header"),
        (Some("Bearer wrong-token"), "wrong token"),
        (Some(&*format!("Bearer {TOKEN}x")), "longer token"),
        (Some(&*format!("Basic {TOKEN}")), "wrong scheme"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = http(guarded.mgmt, "POST", "/v1/disks/0/offline", &headers, b"");
        api.check("POST", "/v1/disks/{id}/offline", &r);
        api.check_error(&r, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{why}");
    }
    // Unauthenticated callers learn nothing about disks: 401 even for a bad id.
    assert_eq!(
        post(&guarded, "/v1/disks/99/offline", None, b"").status,
        401
    );
    let d = api.check("GET", "/v1/disks/{id}", &get(&guarded, "/v1/disks/0"));
    assert_eq!(d["state"], "online", "refused requests changed nothing");
    let r = post(&guarded, "/v1/disks/0/offline", Some(TOKEN), b"");
    assert_eq!(
        api.check("POST", "/v1/disks/{id}/offline", &r)["state"],
        "offline"
    );
    let r = post(&guarded, "/v1/disks/0/online", Some(TOKEN), b"");
    assert_eq!(
        api.check("POST", "/v1/disks/{id}/online", &r)["state"],
        "online"
    );
}

#[test]
fn bad_requests_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, &["--mgmt-token", TOKEN]);
    let api = Api::fetch(&node);

    // Bad paths.
    for path in [
        "/nope",
        "/v1",
        "/v1/disks/",
        "/v1/disks/0/nope",
        "/v2/node",
        "/v1/disks/0/offline/x",
    ] {
        api.check_error(&get(&node, path), 404);
    }
    // Bad ids: not a number (400), no such disk (404).
    for id in ["x", "-1", "70000", "1.5", "%ff", "0x1"] {
        let r = get(&node, &format!("/v1/disks/{id}"));
        api.check_error(&r, 400);
        if id != "%ff" {
            api.check("GET", "/v1/disks/{id}", &r);
        }
        let r = post(&node, &format!("/v1/disks/{id}/offline"), Some(TOKEN), b"");
        api.check_error(&r, 400);
    }
    for id in ["2", "65535"] {
        let r = get(&node, &format!("/v1/disks/{id}"));
        api.check("GET", "/v1/disks/{id}", &r);
        api.check_error(&r, 404);
        let r = post(&node, &format!("/v1/disks/{id}/online"), Some(TOKEN), b"");
        api.check("POST", "/v1/disks/{id}/online", &r);
        api.check_error(&r, 404);
    }
    // Wrong methods.
    for (method, path) in [
        ("DELETE", "/v1/disks/0"),
        ("POST", "/v1/health"),
        ("PUT", "/v1/node"),
        ("GET", "/v1/disks/0/offline"),
        ("POST", "/metrics"),
    ] {
        let r = http(node.mgmt, method, path, &[], b"");
        api.check_error(&r, 405);
        assert!(
            r.header("allow").is_some(),
            "{method} {path}: no Allow header"
        );
    }
    // Bad JSON bodies, and one too large.
    for body in [
        &b"{bad"[..],
        b"[1,2]",
        b"[]",
        br#"["why"]"#,
        b"5",
        br#"{"reason": 5}"#,
        br#"{"unknown": 1}"#,
        b"\xff\xfe",
    ] {
        let r = post(&node, "/v1/disks/0/offline", Some(TOKEN), body);
        api.check("POST", "/v1/disks/{id}/offline", &r);
        api.check_error(&r, 400);
    }
    let long_reason = format!(r#"{{"reason":"{}"}}"#, "x".repeat(300));
    api.check_error(
        &post(
            &node,
            "/v1/disks/0/offline",
            Some(TOKEN),
            long_reason.as_bytes(),
        ),
        400,
    );
    api.check_error(
        &post(&node, "/v1/disks/0/offline", Some(TOKEN), &[b' '; 8192]),
        413,
    );
    // None of that changed anything, and the node still serves.
    let d = api.check("GET", "/v1/disks/{id}", &get(&node, "/v1/disks/0"));
    assert_eq!(d["state"], "online");
    assert_eq!(
        api.check("GET", "/v1/health", &get(&node, "/v1/health"))["status"],
        "ok"
    );
}
