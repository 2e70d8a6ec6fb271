//! Pulls from a hostile registry: a hand-written HTTP/1.1 server on
//! 127.0.0.1 (plain HTTP, as loopback registries are reached) that serves
//! blobs longer or shorter than their descriptors, a 100 MiB manifest,
//! and decompression bombs. Each pull must fail with the bound it hit and
//! leave nothing partial in the content store. Nothing here connects
//! anywhere but 127.0.0.1.

use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read as _, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use vmcri_image::content::{ContentError, ContentStore, Digest};
use vmcri_image::limits::{Exhausted, Limits, MAX_DOCUMENT_BYTES};
use vmcri_image::pull::{pull, PullError, PulledImage};
use vmcri_image::reference::Reference;

const MIB: u64 = 1 << 20;
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What follows a reply's first bytes.
#[derive(Clone, Copy)]
enum Fill {
    /// Nothing.
    None,
    /// `n` more copies of a byte, streamed (never allocated).
    Bytes(u8, u64),
    /// That byte until the client goes away.
    Forever(u8),
}

/// One canned response.
#[derive(Clone)]
struct Reply {
    status: u16,
    /// Sent as is, true or not; `None` makes the body end at close.
    content_length: Option<u64>,
    head: Arc<Vec<u8>>,
    fill: Fill,
}

impl Reply {
    fn ok(body: Vec<u8>) -> Reply {
        Reply {
            status: 200,
            content_length: Some(body.len() as u64),
            head: Arc::new(body),
            fill: Fill::None,
        }
    }
}

/// The hostile registry.
#[derive(Clone)]
struct Hostile {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    /// Body bytes the server got into the socket, over all replies.
    sent: Arc<AtomicU64>,
    /// Paths asked for, in order.
    hits: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    async fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = Hostile {
            addr: listener.local_addr().unwrap(),
            routes: Arc::default(),
            sent: Arc::default(),
            hits: Arc::default(),
        };
        h.route("/v2/", Reply::ok(b"{}".to_vec()));
        let server = h.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(conn));
            }
        });
        h
    }

    fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_string(), reply);
    }

    fn hit(&self, path: &str) -> bool {
        self.hits.lock().unwrap().iter().any(|p| p == path)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// One request per connection, then close: simple, and what makes a
    /// body without Content-Length end.
    async fn serve(self, conn: TcpStream) {
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_string();
        loop {
            let mut header = String::new();
            if conn.read_line(&mut header).await.unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        self.hits.lock().unwrap().push(path.clone());
        let reply = self.routes.lock().unwrap().get(&path).cloned();
        let reply = reply.unwrap_or(Reply {
            status: 404,
            ..Reply::ok(br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#.to_vec())
        });
        let _ = self.respond(conn.get_mut(), &reply).await;
    }

    async fn respond(&self, conn: &mut TcpStream, r: &Reply) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", r.status);
        if let Some(n) = r.content_length {
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(&r.head).await?;
        self.sent.fetch_add(r.head.len() as u64, Ordering::SeqCst);
        let (byte, mut left) = match r.fill {
            Fill::None => (0, 0),
            Fill::Bytes(b, n) => (b, n),
            Fill::Forever(b) => (b, u64::MAX),
        };
        let chunk = vec![byte; 64 << 10];
        while left > 0 {
            let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
            conn.write_all(&chunk[..n]).await?;
            self.sent.fetch_add(n as u64, Ordering::SeqCst);
            left -= n as u64;
        }
        conn.shutdown().await
    }

    fn reference(&self, repo: &str) -> Reference {
        Reference::parse(&format!("{}/{repo}:v1", self.addr)).unwrap()
    }

    fn blob_path(&self, repo: &str, digest: &str) -> String {
        format!("/v2/{repo}/blobs/{digest}")
    }
}

fn sha(data: &[u8]) -> String {
    Digest::of(data).to_string()
}

/// A layer as served: its blob, diff ID and media type.
struct Layer {
    blob: Vec<u8>,
    diff_id: String,
    media_type: &'static str,
}

/// Hashes what is written through it: a layer's diff ID while the tar is
/// compressed, so bombs never exist uncompressed.
struct Tee<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a tar of `files` (name, length of zeros) into `out`, returning
/// the tar's digest (the diff ID).
fn tar_into<W: Write>(out: W, files: &[(String, u64)]) -> (W, String) {
    let mut tee = Tee {
        inner: out,
        hash: Sha256::new(),
    };
    {
        let mut b = tar::Builder::new(&mut tee);
        for (name, len) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*len);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, io::repeat(0).take(*len))
                .unwrap();
        }
        b.finish().unwrap();
    }
    let hex: String = tee
        .hash
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (tee.inner, format!("sha256:{hex}"))
}

fn zstd_layer(files: &[(String, u64)]) -> Layer {
    let enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
    let (enc, diff_id) = tar_into(enc, files);
    Layer {
        blob: enc.finish().unwrap(),
        diff_id,
        media_type: TAR_ZST,
    }
}

fn gzip_layer(files: &[(String, u64)]) -> Layer {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let (enc, diff_id) = tar_into(enc, files);
    Layer {
        blob: enc.finish().unwrap(),
        diff_id,
        media_type: TAR_GZ,
    }
}

fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": sha(data),
        "size": data.len(),
    })
}

/// What `serve_image` put up.
struct Served {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer_digests: Vec<String>,
}

/// Serves a well-formed image of `layers` as `repo:v1`.
fn serve_image(reg: &Hostile, repo: &str, layers: &[Layer]) -> Served {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|l| descriptor(l.media_type, &l.blob)).collect::<Vec<_>>(),
    }))
    .unwrap();
    reg.route(
        &reg.blob_path(repo, &sha(&config)),
        Reply::ok(config.clone()),
    );
    for l in layers {
        reg.route(
            &reg.blob_path(repo, &sha(&l.blob)),
            Reply::ok(l.blob.clone()),
        );
    }
    reg.route(
        &format!("/v2/{repo}/manifests/v1"),
        Reply::ok(manifest.clone()),
    );
    Served {
        manifest,
        config,
        layer_digests: layers.iter().map(|l| sha(&l.blob)).collect(),
    }
}

/// Limits for tests: no free-space floor (the machine's disk is not what
/// is tested), the rest as given.
fn limits() -> Limits {
    Limits {
        min_free_bytes: 0,
        min_free_percent: 0,
        ..Limits::default()
    }
}

async fn pull_with(
    store: &ContentStore,
    reference: &Reference,
    limits: &Limits,
) -> Result<PulledImage, PullError> {
    pull(store, reference, None, &BTreeMap::new(), limits).await
}

/// The bound a failed pull reports.
fn exhausted(r: Result<PulledImage, PullError>) -> Exhausted {
    match r {
        Err(PullError::Exhausted { why, .. }) => why,
        Err(e) => panic!("expected a bound, got {e:?}"),
        Ok(_) => panic!("the pull succeeded"),
    }
}

/// Scratch files and partial layers left in the store under `root`.
fn leftovers(root: &Path) -> Vec<String> {
    let names = |d: &str| -> Vec<String> {
        std::fs::read_dir(root.join(d))
            .unwrap()
            .map(|e| format!("{d}/{}", e.unwrap().file_name().to_string_lossy()))
            .collect()
    };
    let mut out = names("tmp");
    out.extend(
        names("layers")
            .into_iter()
            .filter(|n| n.ends_with(".partial")),
    );
    out
}

/// Unpacked layer directories in the store.
fn layer_dirs(root: &Path) -> usize {
    std::fs::read_dir(root.join("layers"))
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')
        })
        .count()
}

fn store() -> (tempfile::TempDir, ContentStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    (dir, store)
}

fn small_layer() -> Layer {
    gzip_layer(&[("etc/hello".into(), 100)])
}

#[tokio::test]
async fn a_well_formed_image_pulls_and_records_its_usage() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let served = serve_image(&reg, "ok/app", &[small_layer(), small_layer()]);
    let img = pull_with(&store, &reg.reference("ok/app"), &limits())
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, sha(&served.manifest));
    assert_eq!(img.config, served.config);
    assert_eq!(img.chain.len(), 2);
    assert_eq!(layer_dirs(dir.path()), 2);
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64_and_a_pin_is_its_digest() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let served = serve_image(&reg, "idx/app", &[small_layer()]);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {"mediaType": MANIFEST, "digest": sha(b"arm"), "size": 3,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": MANIFEST, "digest": sha(&served.manifest),
             "size": served.manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let by_digest = format!("/v2/idx/app/manifests/{}", sha(&served.manifest));
    reg.route(&by_digest, Reply::ok(served.manifest.clone()));
    reg.route("/v2/idx/app/manifests/v1", Reply::ok(index.clone()));
    let img = pull_with(&store, &reg.reference("idx/app"), &limits())
        .await
        .unwrap();
    assert_eq!(
        img.manifest_digest,
        sha(&index),
        "the repo digest is the index's"
    );
    let pinned = Reference::parse(&format!("{}/idx/app@{}", reg.addr, sha(&index))).unwrap();
    reg.route(
        &format!("/v2/idx/app/manifests/{}", sha(&index)),
        Reply::ok(index.clone()),
    );
    assert!(pull_with(&store, &pinned, &limits()).await.is_ok());
    // A registry that serves something else under a pinned digest.
    let other = Reference::parse(&format!("{}/idx/app@{}", reg.addr, sha(b"other"))).unwrap();
    reg.route(
        &format!("/v2/idx/app/manifests/{}", sha(b"other")),
        Reply::ok(index),
    );
    assert!(matches!(
        pull_with(&store, &other, &limits()).await,
        Err(PullError::Invalid { .. })
    ));
    assert!(leftovers(dir.path()).is_empty());
}

/// (a) A blob longer than its descriptor: announced by Content-Length (so
/// refused before a byte is read), or with no length at all and no end.
#[tokio::test]
async fn a_blob_longer_than_its_descriptor_fails_at_once() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let layer = small_layer();
    let served = serve_image(&reg, "long/app", &[layer]);
    let path = reg.blob_path("long/app", &served.layer_digests[0]);
    let blob = reg.routes.lock().unwrap()[&path].head.clone();
    let framed = Reply {
        status: 200,
        content_length: Some(blob.len() as u64 + MIB),
        head: blob.clone(),
        fill: Fill::Bytes(0, MIB),
    };
    let endless = Reply {
        status: 200,
        content_length: None,
        head: blob.clone(),
        fill: Fill::Forever(0),
    };
    for reply in [framed, endless] {
        reg.route(&path, reply);
        let why = exhausted(pull_with(&store, &reg.reference("long/app"), &limits()).await);
        assert_eq!(
            why,
            Exhausted::BlobTooLong {
                digest: served.layer_digests[0].clone(),
                size: blob.len() as u64,
            }
        );
        assert!(!store.has_blob(&Digest::parse(&served.layer_digests[0]).unwrap()));
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
        assert_eq!(layer_dirs(dir.path()), 0);
    }
    // The endless body was abandoned, not drained: give the server a
    // moment to notice, then count what it got out.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        reg.sent() < 64 * MIB,
        "the server sent {} bytes",
        reg.sent()
    );
}

#[tokio::test]
async fn a_blob_shorter_than_its_descriptor_fails() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let served = serve_image(&reg, "short/app", &[small_layer()]);
    let path = reg.blob_path("short/app", &served.layer_digests[0]);
    let blob = reg.routes.lock().unwrap()[&path].head.clone();
    reg.route(&path, Reply::ok(blob[..blob.len() - 10].to_vec()));
    let err = pull_with(&store, &reg.reference("short/app"), &limits())
        .await
        .unwrap_err();
    match err {
        PullError::Content(ContentError::Mismatch { why, .. }) => {
            assert!(why.contains("expected"), "{why}")
        }
        e => panic!("expected a mismatch, got {e:?}"),
    }
    assert!(!store.has_blob(&Digest::parse(&served.layer_digests[0]).unwrap()));
    assert!(leftovers(dir.path()).is_empty());
    assert_eq!(layer_dirs(dir.path()), 0);
}

/// (b) A 100 MiB manifest, streamed by the server (never allocated) with
/// no Content-Length, or with one: the client gives up at 4 MiB.
#[tokio::test]
async fn a_100_mib_manifest_is_refused_after_4_mib() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let prefix = br#"{"schemaVersion":2,"annotations":{"x":""#.to_vec();
    for content_length in [None, Some(100 * MIB)] {
        let before = reg.sent();
        reg.route(
            "/v2/big/app/manifests/v1",
            Reply {
                status: 200,
                content_length,
                head: Arc::new(prefix.clone()),
                fill: Fill::Bytes(b'a', 100 * MIB - prefix.len() as u64),
            },
        );
        let why = exhausted(pull_with(&store, &reg.reference("big/app"), &limits()).await);
        assert_eq!(
            why,
            Exhausted::DocumentTooLarge {
                what: "manifest",
                limit: MAX_DOCUMENT_BYTES
            }
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let sent = reg.sent() - before;
        assert!(sent < 32 * MIB, "the server got {sent} bytes out");
    }
    assert!(leftovers(dir.path()).is_empty());
    assert_eq!(layer_dirs(dir.path()), 0);
}

#[tokio::test]
async fn a_config_over_4_mib_is_refused_before_it_is_fetched() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let config = vec![b' '; 5 << 20];
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [],
    }))
    .unwrap();
    reg.route("/v2/cfg/app/manifests/v1", Reply::ok(manifest));
    let why = exhausted(pull_with(&store, &reg.reference("cfg/app"), &limits()).await);
    assert_eq!(
        why,
        Exhausted::DocumentTooLarge {
            what: "image config",
            limit: MAX_DOCUMENT_BYTES
        }
    );
    assert!(!reg.hit(&reg.blob_path("cfg/app", &sha(&config))));
    assert!(leftovers(dir.path()).is_empty());
}

/// (c) Decompression bombs: a few KiB on the wire, 64 MiB of zeros
/// unpacked, against an 8 MiB layer budget.
#[tokio::test]
async fn zstd_and_gzip_bombs_stop_at_the_layer_budget() {
    let bombs = [
        zstd_layer(&[("zeros".into(), 64 * MIB)]),
        gzip_layer(&[("zeros".into(), 64 * MIB)]),
    ];
    for bomb in bombs {
        assert!(bomb.blob.len() < 256 << 10, "{} bytes", bomb.blob.len());
        let reg = Hostile::start().await;
        let (dir, store) = store();
        serve_image(&reg, "bomb/app", &[bomb]);
        let limits = Limits {
            max_layer_bytes: 8 * MIB,
            ..limits()
        };
        let started = std::time::Instant::now();
        let why = exhausted(pull_with(&store, &reg.reference("bomb/app"), &limits).await);
        assert_eq!(why, Exhausted::LayerBytes { limit: 8 * MIB });
        assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
        assert_eq!(layer_dirs(dir.path()), 0, "no layer from a bomb");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}

#[tokio::test]
async fn an_image_over_its_budget_fails_though_each_layer_fits() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let layers = [
        zstd_layer(&[("a".into(), 5 * MIB)]),
        zstd_layer(&[("b".into(), 5 * MIB)]),
    ];
    serve_image(&reg, "wide/app", &layers);
    let limits = Limits {
        max_layer_bytes: 8 * MIB,
        max_image_bytes: 8 * MIB,
        ..limits()
    };
    let why = exhausted(pull_with(&store, &reg.reference("wide/app"), &limits).await);
    assert_eq!(why, Exhausted::ImageBytes { limit: 8 * MIB });
    assert_eq!(layer_dirs(dir.path()), 1, "only the first, complete layer");
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test]
async fn an_inode_bomb_stops_at_the_layer_budget() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let files: Vec<(String, u64)> = (0..1000).map(|i| (format!("d/f{i}"), 0)).collect();
    serve_image(&reg, "inodes/app", &[zstd_layer(&files)]);
    let limits = Limits {
        max_layer_inodes: 100,
        ..limits()
    };
    let why = exhausted(pull_with(&store, &reg.reference("inodes/app"), &limits).await);
    assert_eq!(why, Exhausted::LayerInodes { limit: 100 });
    assert_eq!(layer_dirs(dir.path()), 0);
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test]
async fn a_pull_below_the_free_space_floor_fails_before_any_blob() {
    let reg = Hostile::start().await;
    let (dir, store) = store();
    let served = serve_image(&reg, "full/app", &[small_layer()]);
    for floor in [
        Limits {
            min_free_bytes: u64::MAX,
            ..limits()
        },
        Limits {
            min_free_percent: 100,
            ..limits()
        },
    ] {
        let why = exhausted(pull_with(&store, &reg.reference("full/app"), &floor).await);
        assert!(matches!(why, Exhausted::FreeSpace { .. }), "{why:?}");
    }
    assert!(!reg.hit(&reg.blob_path("full/app", &sha(&served.config))));
    assert!(!reg.hit(&reg.blob_path("full/app", &served.layer_digests[0])));
    assert!(leftovers(dir.path()).is_empty());
}
