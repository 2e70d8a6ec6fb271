//! The ImageService against a real registry on loopback (Debian's
//! docker-registry, started here), with an image built by the test as an
//! OCI layout and pushed with skopeo: pull by tag and by digest, mirrors,
//! listing, status, removal, and a tampered blob.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use tonic::Code;
use vmcri_tests::registry::{
    layout, push, push_as, sha256_hex, start_registry, start_registry_with, Entry,
};
use vmcri_tests::{Daemon, Scratch};

/// Writes a one-layer OCI image layout (a file and the config's user) and
/// returns its directory.
fn build_layout(dir: &Path, content: &[u8]) -> PathBuf {
    layout(
        dir,
        &[Entry::File("etc/hello.txt", content, 0o644)],
        r#"{"User":"1000:1000"}"#,
    )
}

fn start_daemon(dir: &Path, extra_config: &str) -> Daemon {
    Daemon::start(
        dir,
        &format!("default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n{extra_config}"),
    )
}

async fn client(daemon: &Daemon) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(daemon.channel().await)
}

fn spec(i: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: i.into(),
        ..Default::default()
    })
}

/// ImageStatus of `image`.
async fn status(
    img: &mut ImageServiceClient<Channel>,
    image: &str,
    verbose: bool,
) -> cri::ImageStatusResponse {
    img.image_status(cri::ImageStatusRequest {
        image: spec(image),
        verbose,
    })
    .await
    .expect("ImageStatus")
    .into_inner()
}

fn pull_req(i: &str) -> cri::PullImageRequest {
    cri::PullImageRequest {
        image: spec(i),
        auth: None,
        sandbox_config: None,
    }
}

#[test]
fn pull_list_status_remove_by_tag_digest_and_mirror() {
    let scratch = Scratch::new("images").unwrap();
    let registry = start_registry(&scratch.0);
    let layout = build_layout(&scratch.0, b"hello from the image\n");
    push(&layout, registry.port, "test/app");
    let mirror_cfg = format!(
        "[registries.\"registry.example.test\"]\nmirrors = [\"http://127.0.0.1:{}\"]\n",
        registry.port
    );
    let daemon = start_daemon(&scratch.0, &mirror_cfg);
    let root = scratch.0.join("root");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let name = format!("127.0.0.1:{}/test/app:v1", registry.port);
        let id = img
            .pull_image(pull_req(&name))
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");

        let list = img
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images;
        assert_eq!(list.len(), 1);
        let image = &list[0];
        assert_eq!(image.id, id);
        assert_eq!(image.repo_tags, vec![name.clone()]);
        assert_eq!(image.repo_digests.len(), 1);
        assert_eq!(image.uid.as_ref().map(|u| u.value), Some(1000));
        assert!(image.size > 0);

        // The layer is unpacked once, by chain ID, with its content.
        let layers: Vec<PathBuf> = std::fs::read_dir(root.join("content/layers"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert_eq!(layers.len(), 1);
        assert_eq!(
            std::fs::read(layers[0].join("etc/hello.txt")).unwrap(),
            b"hello from the image\n"
        );

        // By digest: the same image, found by its repo digest too.
        let by_digest = image.repo_digests[0].clone();
        let id2 = img
            .pull_image(pull_req(&by_digest))
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        assert_eq!(id2, id);
        let st = status(&mut img, &by_digest, true).await;
        assert_eq!(st.image.unwrap().id, id);
        assert!(st.info["info"].contains("chain"));

        // Through a mirror: the name stays the one asked for.
        let mirrored = "registry.example.test/test/app:v1";
        let id3 = img
            .pull_image(pull_req(mirrored))
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        assert_eq!(id3, id);
        let st = status(&mut img, mirrored, false).await;
        let tags = st.image.unwrap().repo_tags;
        assert!(
            tags.contains(&mirrored.to_string()) && tags.contains(&name),
            "{tags:?}"
        );

        // A tag that does not exist, and a registry that is down.
        let e = img
            .pull_image(pull_req(&format!(
                "127.0.0.1:{}/test/app:nope",
                registry.port
            )))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::Unavailable | Code::NotFound),
            "{e:?}"
        );

        // Removing by tag drops one tag at a time; then the image.
        img.remove_image(cri::RemoveImageRequest {
            image: spec(mirrored),
        })
        .await
        .unwrap();
        let st = status(&mut img, &name, false).await;
        assert_eq!(st.image.unwrap().repo_tags, vec![name.clone()]);
        img.remove_image(cri::RemoveImageRequest { image: spec(&name) })
            .await
            .unwrap();
        // Its layer and blobs went with it: no other image used them.
        let content = root.join("content");
        let visible = |d: &str| {
            std::fs::read_dir(content.join(d))
                .unwrap()
                .filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('.')
                })
                .count()
        };
        assert_eq!(visible("layers"), 0);
        assert_eq!(visible("blobs/sha256"), 0);
        let st = status(&mut img, &id, false).await;
        assert!(st.image.is_none());
        let fs = img
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 0);
    });
}

#[test]
fn a_tampered_blob_fails_the_pull_and_leaves_nothing() {
    let scratch = Scratch::new("images-tamper").unwrap();
    let registry = start_registry(&scratch.0);
    let layout = build_layout(&scratch.0, b"original\n");
    push(&layout, registry.port, "test/bad");
    // Corrupt the layer blob inside the registry's storage.
    let blobs = scratch
        .0
        .join("registry-data/docker/registry/v2/blobs/sha256");
    let mut corrupted = 0;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = blob.unwrap().path().join("data");
            let bytes = std::fs::read(&data).unwrap();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 10] ^= 0xff;
                std::fs::write(&data, b).unwrap();
                corrupted += 1;
            }
        }
    }
    assert_eq!(corrupted, 1);
    let daemon = start_daemon(&scratch.0, "");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let e = img
            .pull_image(pull_req(&format!(
                "127.0.0.1:{}/test/bad:v1",
                registry.port
            )))
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        let list = img
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images;
        assert!(list.is_empty(), "a failed pull records no image");
    });
    let layers = scratch.0.join("root/content/layers");
    let visible: Vec<_> = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(visible.is_empty(), "no layer from a bad blob: {visible:?}");
}

#[test]
fn an_unreadable_configured_ca_fails_the_pull_clearly() {
    let scratch = Scratch::new("images-ca").unwrap();
    let daemon = start_daemon(
        &scratch.0,
        "[registries.\"127.0.0.1:1\"]\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let e = img
            .pull_image(pull_req("127.0.0.1:1/x/y:v1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("CA bundle /nonexistent/ca.pem"),
            "{}",
            e.message()
        );
    });
}

/// A registry behind htpasswd basic auth: the right credentials pull (as
/// username/password or as the base64 `auth` field), missing or wrong
/// ones are Unauthenticated, and a registry token is refused as
/// unimplemented rather than ignored.
#[test]
fn htpasswd_auth_accepts_the_right_password_and_refuses_others() {
    let scratch = Scratch::new("images-auth").unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let htpasswd = scratch.0.join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let registry = start_registry_with(&scratch.0, Some(&htpasswd));
    let layout = build_layout(&scratch.0, b"behind a password\n");
    push_as(&layout, registry.port, "private/app", Some("alice:s3cret"));
    let daemon = start_daemon(&scratch.0, "");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let name = format!("127.0.0.1:{}/private/app:v1", registry.port);
        let with = |auth: Option<cri::AuthConfig>| cri::PullImageRequest {
            auth,
            ..pull_req(&name)
        };
        let user_pass = |user: &str, pass: &str| {
            Some(cri::AuthConfig {
                username: user.into(),
                password: pass.into(),
                ..Default::default()
            })
        };
        let e = img.pull_image(with(None)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = img
            .pull_image(with(user_pass("alice", "wrong")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = img
            .pull_image(with(Some(cri::AuthConfig {
                registry_token: "opaque".into(),
                ..Default::default()
            })))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
        // Nothing of the refused pulls stayed behind.
        assert!(img
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images
            .is_empty());

        img.pull_image(with(user_pass("alice", "s3cret")))
            .await
            .expect("pull with username and password");
        img.remove_image(cri::RemoveImageRequest { image: spec(&name) })
            .await
            .unwrap();
        let auth = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        };
        img.pull_image(with(Some(cri::AuthConfig {
            auth,
            ..Default::default()
        })))
        .await
        .expect("pull with the base64 auth field");
    });
}

/// `vmcri images prune`, beside a running daemon: content no image uses
/// and leftovers of interrupted pulls go; the pulled image keeps its blobs
/// and layers.
#[test]
fn prune_keeps_what_images_use_and_deletes_the_rest() {
    let scratch = Scratch::new("images-prune").unwrap();
    let registry = start_registry(&scratch.0);
    let layout = build_layout(&scratch.0, b"kept\n");
    push(&layout, registry.port, "test/kept");
    let daemon = start_daemon(&scratch.0, "");
    let root = scratch.0.join("root");
    let content = root.join("content");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = format!("127.0.0.1:{}/test/kept:v1", registry.port);
    rt.block_on(async {
        let mut img = client(&daemon).await;
        img.pull_image(pull_req(&name)).await.unwrap();
    });
    let kept_blobs = std::fs::read_dir(content.join("blobs/sha256"))
        .unwrap()
        .count();
    // Layer directories (not the per-layer unpack locks beside them).
    let kept_layers: Vec<_> = std::fs::read_dir(content.join("layers"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    assert!(!kept_layers.is_empty());
    // An unreferenced (but valid) blob, a half-downloaded one, and a
    // half-unpacked layer.
    let junk = b"nobody uses me";
    let junk_blob = content.join("blobs/sha256").join(sha256_hex(junk));
    std::fs::write(&junk_blob, junk).unwrap();
    std::fs::write(content.join("tmp/download-in-progress"), b"partial").unwrap();
    std::fs::create_dir_all(content.join("layers/.abc.partial/etc")).unwrap();

    let out = std::process::Command::new(&vmcri_tests::artifacts().vmcri)
        .args(["images", "prune", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("deleted 1 blobs"), "{said}");

    assert!(!junk_blob.exists());
    assert!(!content.join("tmp/download-in-progress").exists());
    assert!(!content.join("layers/.abc.partial").exists());
    assert_eq!(
        std::fs::read_dir(content.join("blobs/sha256"))
            .unwrap()
            .count(),
        kept_blobs
    );
    for l in &kept_layers {
        assert!(
            l.join("etc/hello.txt").exists(),
            "{} was pruned",
            l.display()
        );
    }
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let st = status(&mut img, &name, false).await;
        assert!(st.image.is_some(), "the image survived the prune");
    });
}

/// The layer digests of the layout's manifest, lowest first.
fn layer_digests(layout: &Path) -> Vec<String> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(manifest_digest)).unwrap()).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

/// A pull that fails part-way (a layer the registry cannot serve) keeps
/// the verified blobs it got, records no image, and the next pull resumes
/// from them instead of downloading them again.
#[test]
fn an_interrupted_pull_resumes_from_the_blobs_it_verified() {
    use std::os::unix::fs::MetadataExt;
    let scratch = Scratch::new("images-resume").unwrap();
    let registry = start_registry(&scratch.0);
    let big: Vec<u8> = (0u32..(2 << 20))
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let layers: [&[Entry]; 3] = [
        &[Entry::File("one", &big, 0o644)],
        &[Entry::File("two", b"second layer", 0o644)],
        &[Entry::File("three", b"third layer", 0o644)],
    ];
    let layout = vmcri_tests::registry::layout_layers(&scratch.0, &layers, "{}");
    push(&layout, registry.port, "test/resume");
    let digests = layer_digests(&layout);
    // The registry loses the last layer for a while.
    let last = &digests[2];
    let stored = scratch
        .0
        .join("registry-data/docker/registry/v2/blobs/sha256")
        .join(&last[..2])
        .join(last)
        .join("data");
    let aside = scratch.0.join("aside");
    std::fs::rename(&stored, &aside).unwrap();
    let daemon = start_daemon(&scratch.0, "");
    let blobs = scratch.0.join("root/content/blobs/sha256");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = format!("127.0.0.1:{}/test/resume:v1", registry.port);
    rt.block_on(async {
        let mut img = client(&daemon).await;
        let e = img.pull_image(pull_req(&name)).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok, "{e:?}");
        assert!(status(&mut img, &name, false).await.image.is_none());
    });
    let kept: Vec<(String, u64)> = digests[..2]
        .iter()
        .filter_map(|d| {
            std::fs::metadata(blobs.join(d))
                .ok()
                .map(|m| (d.clone(), m.ino()))
        })
        .collect();
    assert!(!kept.is_empty(), "no verified layer was kept for the retry");
    assert!(!blobs.join(last).exists());

    std::fs::rename(&aside, &stored).unwrap();
    rt.block_on(async {
        let mut img = client(&daemon).await;
        img.pull_image(pull_req(&name))
            .await
            .expect("the retry pulls");
    });
    for (d, ino) in kept {
        assert_eq!(
            std::fs::metadata(blobs.join(&d)).unwrap().ino(),
            ino,
            "blob {d} was downloaded again"
        );
    }
    assert!(blobs.join(last).exists());
}
