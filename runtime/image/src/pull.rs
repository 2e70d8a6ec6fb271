//! Pulling an image from a registry into the content store: manifest
//! (image indexes resolve to linux/amd64), config, then each layer,
//! verified by digest, unpacked once by chain ID. Mirrors are tried in
//! order before the registry itself.
//!
//! Every registry is treated as hostile: manifests and configs are read
//! with a cap ([`MAX_DOCUMENT_BYTES`]), a blob fails the moment it runs
//! past its descriptor's size, layers and images unpack within their
//! budgets, and nothing may take the store's filesystem below its floor
//! (see [`crate::limits`]). A bound that trips is [`PullError::Exhausted`].

use crate::content::{ContentError, ContentStore, Digest};
use crate::limits::{Exhausted, Limits, Usage, MAX_DOCUMENT_BYTES};
use crate::manifest::{self, Authorization, ManifestError, ManifestFetcher};
use crate::reference::Reference;
use crate::registry::{endpoints, Endpoint, RegistryConfig};
use crate::unpack::{Compression, UnpackError};
use futures_util::StreamExt;
use oci_client::client::{
    linux_amd64_resolver, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use std::collections::BTreeMap;
use thiserror::Error;

/// Registry credentials from the CRI AuthConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (or token used as one).
    pub password: String,
}

/// What a pull produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The image ID: its config digest.
    pub id: Digest,
    /// The manifest digest (`sha256:...`), for repo digests.
    pub manifest_digest: String,
    /// The config JSON.
    pub config: Vec<u8>,
    /// Chain IDs of its layers, bottom first.
    pub chain: Vec<Digest>,
    /// Compressed size of config and layers.
    pub size: u64,
    /// Blobs it needs kept: config and layers.
    pub blobs: Vec<Digest>,
}

/// Why a pull failed.
#[derive(Debug, Error)]
pub enum PullError {
    /// The registry (and every mirror) failed; the last error is given.
    #[error("pulling {reference}: {last}")]
    Registry {
        /// What was pulled.
        reference: String,
        /// The last endpoint's error.
        last: String,
    },
    /// The registry refused our credentials.
    #[error("pulling {reference}: authentication failed: {why}")]
    Unauthorized {
        /// What was pulled.
        reference: String,
        /// What the registry said.
        why: String,
    },
    /// The image is not something we can run.
    #[error("pulling {reference}: {why}")]
    Invalid {
        /// What was pulled.
        reference: String,
        /// Why.
        why: String,
    },
    /// A bound was reached: a document, blob, layer or image too large,
    /// or too little room left on the store's filesystem.
    #[error("pulling {reference}: {why}")]
    Exhausted {
        /// What was pulled.
        reference: String,
        /// Which bound.
        why: Exhausted,
    },
    /// Storing or unpacking failed.
    #[error(transparent)]
    Content(#[from] ContentError),
}

impl PullError {
    /// Lifts a bound reached deep in the store or the unpacker to
    /// [`PullError::Exhausted`], so callers match one variant.
    fn lift(self, reference: &Reference) -> PullError {
        let why = match self {
            PullError::Content(ContentError::Exhausted(why))
            | PullError::Content(ContentError::Unpack(UnpackError::Exhausted(why))) => why,
            other => return other,
        };
        PullError::Exhausted {
            reference: reference.to_string(),
            why,
        }
    }
}

impl From<Exhausted> for PullError {
    fn from(why: Exhausted) -> PullError {
        PullError::Content(ContentError::Exhausted(why))
    }
}

fn host_of_url(url: &str) -> (&str, bool) {
    match url.strip_prefix("http://") {
        Some(h) => (h, true),
        None => (url.strip_prefix("https://").unwrap_or(url), false),
    }
}

/// Pulls `reference` into `store`.
pub async fn pull(
    store: &ContentStore,
    reference: &Reference,
    creds: Option<&Credentials>,
    registries: &BTreeMap<String, RegistryConfig>,
    limits: &Limits,
) -> Result<PulledImage, PullError> {
    let mut last = String::from("no endpoint");
    for ep in endpoints(&reference.registry, registries) {
        match pull_from(store, reference, creds, &ep, limits).await {
            Ok(img) => return Ok(img),
            Err(PullError::Registry { last: why, .. }) => {
                tracing::warn!(endpoint = %ep.url, image = %reference, error = %why, "pull from endpoint failed; trying the next");
                last = format!("{}: {why}", ep.url);
            }
            Err(e) => return Err(e.lift(reference)),
        }
    }
    Err(PullError::Registry {
        reference: reference.to_string(),
        last,
    })
}

/// True when the registry refused who we are (missing or wrong
/// credentials, or no access), as opposed to failing.
fn refused_credentials(e: &OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => true,
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        _ => false,
    }
}

/// One endpoint's clients and the names errors carry.
struct Session<'a> {
    client: Client,
    oref: oci_client::Reference,
    /// The tag or digest the reference names.
    tag_or_digest: String,
    plain_http: bool,
    /// The endpoint's extra CA bundle, for our own manifest requests.
    ca_pem: Option<Vec<u8>>,
    name: String,
    store: &'a ContentStore,
    limits: &'a Limits,
}

impl<'a> Session<'a> {
    /// The clients for `reference` at endpoint `ep`.
    fn connect(
        store: &'a ContentStore,
        reference: &Reference,
        ep: &Endpoint,
        limits: &'a Limits,
    ) -> Result<Session<'a>, PullError> {
        let (host, plain_http) = host_of_url(&ep.url);
        let name = reference.to_string();
        let ca_pem = match &ep.ca_file {
            // A configured CA that cannot be read is an error, not a
            // silent fallback to the system roots.
            Some(ca) => Some(std::fs::read(ca).map_err(|e| PullError::Invalid {
                reference: name.clone(),
                why: format!("reading CA bundle {}: {e}", ca.display()),
            })?),
            None => None,
        };
        let client = Client::new(ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            extra_root_certificates: ca_pem
                .iter()
                .map(|data| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: data.clone(),
                })
                .collect(),
            ..Default::default()
        });
        let tag_or_digest = reference
            .digest
            .clone()
            .or_else(|| reference.tag.clone())
            .unwrap_or_else(|| "latest".into());
        let (registry, repository) = (host.to_string(), reference.repository.clone());
        let oref = match &reference.digest {
            Some(d) => oci_client::Reference::with_digest(registry, repository, d.clone()),
            None => oci_client::Reference::with_tag(registry, repository, tag_or_digest.clone()),
        };
        Ok(Session {
            client,
            oref,
            tag_or_digest,
            plain_http,
            ca_pem,
            name,
            store,
            limits,
        })
    }

    /// The image manifest the reference names, fetched with a cap, and
    /// the digest of what it names (checked against a pinned one).
    async fn resolve(
        &self,
        creds: Option<&Credentials>,
        pinned: Option<&str>,
    ) -> Result<manifest::Resolved, PullError> {
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let authorization = authorize(&self.client, &self.oref, &auth, creds)
            .await
            .map_err(|e| self.registry_err(e))?;
        let fetcher = ManifestFetcher::new(
            if self.plain_http { "http" } else { "https" },
            self.oref.resolve_registry(),
            self.oref.repository(),
            self.ca_pem.as_deref(),
            authorization,
        )
        .map_err(|e| self.manifest_err(e))?;
        manifest::resolve(&fetcher, &self.tag_or_digest, pinned)
            .await
            .map_err(|e| self.manifest_err(e))
    }

    /// Refuses, before any blob is fetched, layers we cannot unpack and
    /// sizes that cannot fit.
    fn check(&self, manifest: &OciImageManifest) -> Result<(), PullError> {
        for layer in &manifest.layers {
            Compression::from_media_type(&layer.media_type).map_err(ContentError::from)?;
        }
        check_sizes(manifest, self.store, self.limits).map_err(|e| match e {
            CheckError::Invalid(why) => self.invalid(why),
            CheckError::Content(e) => e.into(),
        })
    }

    /// The config blob, fetched into the store and read back: verified to
    /// be its descriptor's size, itself within the cap.
    async fn config(&self, desc: &OciDescriptor) -> Result<(Digest, Vec<u8>), PullError> {
        let digest = self.fetch_blob(desc).await?;
        let path = self.store.blob_path(&digest);
        let data = std::fs::read(&path).map_err(|source| ContentError::Io {
            what: format!("read {}", path.display()),
            source,
        })?;
        Ok((digest, data))
    }

    /// Fetches and unpacks each layer, bottom first, within the image's
    /// budget; returns their chain IDs.
    async fn layers(
        &self,
        layers: &[OciDescriptor],
        diff_ids: &[Digest],
    ) -> Result<Vec<Digest>, PullError> {
        let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
        let mut used = Usage::default();
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let blob = self.fetch_blob(layer).await?;
            let chain_id = Digest::chain(chain.last(), diff_id);
            let (store, media, diff, chain2, limits) = (
                self.store.clone(),
                layer.media_type.clone(),
                diff_id.clone(),
                chain_id.clone(),
                *self.limits,
            );
            let unpacked = tokio::task::spawn_blocking(move || {
                store.unpack(&blob, &media, &diff, &chain2, &limits, used)
            })
            .await
            .map_err(|e| self.invalid(format!("unpack task: {e}")))??;
            // A layer already unpacked for another image counts here too.
            used = used.plus(unpacked.usage);
            self.limits.check_image(used)?;
            chain.push(chain_id);
        }
        Ok(chain)
    }

    fn invalid(&self, why: String) -> PullError {
        PullError::Invalid {
            reference: self.name.clone(),
            why,
        }
    }

    fn registry_err(&self, e: OciDistributionError) -> PullError {
        let text = e.to_string();
        if refused_credentials(&e) {
            PullError::Unauthorized {
                reference: self.name.clone(),
                why: text,
            }
        } else {
            PullError::Registry {
                reference: self.name.clone(),
                last: text,
            }
        }
    }

    fn manifest_err(&self, e: ManifestError) -> PullError {
        let reference = self.name.clone();
        match e {
            ManifestError::Unauthorized { .. } => PullError::Unauthorized {
                reference,
                why: e.to_string(),
            },
            ManifestError::Registry { .. } => PullError::Registry {
                reference,
                last: e.to_string(),
            },
            ManifestError::Invalid(why) => PullError::Invalid { reference, why },
            ManifestError::Exhausted(why) => PullError::Exhausted { reference, why },
        }
    }

    /// Streams the blob `desc` into the store unless it is there already.
    /// oci-client's stream is not trusted to stop at the descriptor's
    /// size: the store's writer refuses the first byte past it, and a
    /// Content-Length that says more is refused before reading at all.
    async fn fetch_blob(&self, desc: &OciDescriptor) -> Result<Digest, PullError> {
        let digest = Digest::parse(&desc.digest)?;
        if self.store.has_blob(&digest) {
            return Ok(digest);
        }
        let size = descriptor_size(desc).map_err(|why| self.invalid(why))?;
        let mut writer = self.store.begin_blob(&digest, size, self.limits).await?;
        // oci-client fetches a descriptor's `urls` when the registry fails:
        // a hostile manifest would send us anywhere. Linux layers never
        // need them.
        let desc = OciDescriptor {
            urls: None,
            ..desc.clone()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.oref, &desc)
            .await
            .map_err(|e| self.registry_err(e))?;
        if stream.content_length.is_some_and(|n| n > size) {
            return Err(Exhausted::BlobTooLong {
                digest: digest.to_string(),
                size,
            }
            .into());
        }
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => writer.write(&bytes).await?,
                Err(e) => return Err(self.stream_err(&writer, e)),
            }
        }
        writer.commit().await?;
        Ok(digest)
    }

    /// A blob stream's error: oci-client ends a stream whose digest is
    /// wrong with one, and then the store's verdict (short, or another
    /// digest) is the precise one; anything else is the registry's.
    fn stream_err(&self, writer: &crate::content::BlobWriter, e: std::io::Error) -> PullError {
        let digest_error = e
            .get_ref()
            .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
        match writer.verify() {
            Err(verdict) if digest_error => verdict.into(),
            _ => PullError::Registry {
                reference: self.name.clone(),
                last: e.to_string(),
            },
        }
    }
}

/// A descriptor's size; negative is a lie.
fn descriptor_size(desc: &OciDescriptor) -> Result<u64, String> {
    u64::try_from(desc.size)
        .map_err(|_| format!("descriptor of {} has size {}", desc.digest, desc.size))
}

/// Refuses, before anything is downloaded, what cannot fit: a config
/// over [`MAX_DOCUMENT_BYTES`], a compressed layer larger than any layer
/// within the budget could compress to (gzip and zstd add well under 0.1%
/// to what they cannot compress), and blobs missing from the store that
/// together would take its filesystem below the floor.
fn check_sizes(
    manifest: &OciImageManifest,
    store: &ContentStore,
    limits: &Limits,
) -> Result<(), CheckError> {
    if descriptor_size(&manifest.config)? > MAX_DOCUMENT_BYTES {
        return Err(Exhausted::DocumentTooLarge {
            what: "image config",
            limit: MAX_DOCUMENT_BYTES,
        }
        .into());
    }
    let most = limits
        .max_layer_bytes
        .saturating_add(limits.max_layer_bytes / 1000)
        .saturating_add(64 << 10);
    if let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| descriptor_size(l).is_ok_and(|n| n > most))
    {
        tracing::debug!(blob = %layer.digest, size = layer.size, "layer too large to fit its budget");
        return Err(Exhausted::LayerBytes {
            limit: limits.max_layer_bytes,
        }
        .into());
    }
    let mut missing = 0u64;
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !store.has_blob(&Digest::parse(&d.digest)?) {
            missing = missing.saturating_add(descriptor_size(d)?);
        }
    }
    store.room(limits)?.fits(missing)?;
    Ok(())
}

/// Why [`check_sizes`] refused.
#[derive(Debug, Error)]
enum CheckError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Content(#[from] ContentError),
}

impl From<String> for CheckError {
    fn from(why: String) -> CheckError {
        CheckError::Invalid(why)
    }
}

impl From<Exhausted> for CheckError {
    fn from(why: Exhausted) -> CheckError {
        CheckError::Content(why.into())
    }
}

/// The authorization for our own manifest requests: the bearer token
/// oci-client gets (and caches for its blob requests), else the user's
/// credentials, as oci-client sends them to a registry that asks for
/// basic auth.
async fn authorize(
    client: &Client,
    oref: &oci_client::Reference,
    auth: &RegistryAuth,
    creds: Option<&Credentials>,
) -> Result<Authorization, OciDistributionError> {
    Ok(
        match client.auth(oref, auth, RegistryOperation::Pull).await? {
            Some(token) => Authorization::Bearer(token),
            None => match creds {
                Some(c) => Authorization::Basic(c.username.clone(), c.password.clone()),
                None => Authorization::Anonymous,
            },
        },
    )
}

/// The config's diff IDs, one per layer.
fn diff_ids(config: &[u8], layers: usize) -> Result<Vec<Digest>, String> {
    let parsed: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("config is not JSON: {e}"))?;
    let ids: Vec<Digest> = parsed["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("config has no rootfs.diff_ids")?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ContentError::BadDigest(v.to_string()))
                .and_then(Digest::parse)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    if ids.len() != layers {
        return Err(format!("{layers} layers but {} diff IDs", ids.len()));
    }
    Ok(ids)
}

async fn pull_from(
    store: &ContentStore,
    reference: &Reference,
    creds: Option<&Credentials>,
    ep: &Endpoint,
    limits: &Limits,
) -> Result<PulledImage, PullError> {
    let s = Session::connect(store, reference, ep, limits)?;
    let resolved = s.resolve(creds, reference.digest.as_deref()).await?;
    let manifest = &resolved.manifest;
    s.check(manifest)?;
    let (config_digest, config) = s.config(&manifest.config).await?;
    let diff_ids = diff_ids(&config, manifest.layers.len()).map_err(|why| s.invalid(why))?;
    let chain = s.layers(&manifest.layers, &diff_ids).await?;
    let mut blobs = vec![config_digest.clone()];
    for layer in &manifest.layers {
        blobs.push(Digest::parse(&layer.digest)?);
    }
    let size = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .map(|d| descriptor_size(d).unwrap_or(0))
        .fold(0u64, u64::saturating_add);
    Ok(PulledImage {
        id: config_digest,
        manifest_digest: resolved.digest.to_string(),
        config,
        chain,
        size,
        blobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::errors::OciDistributionError as E;

    #[test]
    fn bounds_reached_deep_down_are_lifted_to_one_variant() {
        let r = Reference::parse("127.0.0.1:5000/a/b:v1").unwrap();
        let why = Exhausted::LayerBytes { limit: 8 };
        for e in [
            PullError::Content(ContentError::Exhausted(why.clone())),
            PullError::Content(ContentError::Unpack(UnpackError::Exhausted(why.clone()))),
        ] {
            assert!(matches!(
                e.lift(&r),
                PullError::Exhausted { why: w, .. } if w == why
            ));
        }
        assert!(matches!(
            PullError::Content(ContentError::MissingBlob("x".into())).lift(&r),
            PullError::Content(_)
        ));
    }

    #[test]
    fn diff_ids_must_match_the_layers() {
        let config = br#"{"rootfs":{"diff_ids":["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]}}"#;
        assert_eq!(diff_ids(config, 1).unwrap().len(), 1);
        assert!(diff_ids(config, 2).is_err());
        assert!(diff_ids(b"{}", 0).is_err());
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["md5:00"]}}"#, 1).is_err());
    }

    #[test]
    fn refused_credentials_are_told_from_failures() {
        assert!(refused_credentials(&E::UnauthorizedError {
            url: "http://r/v2/x/manifests/v1".into()
        }));
        assert!(refused_credentials(&E::AuthenticationFailure(
            "bad token".into()
        )));
        let envelope: oci_client::errors::OciEnvelope =
            serde_json::from_str(r#"{"errors":[{"code":"DENIED","message":"no"}]}"#).unwrap();
        assert!(refused_credentials(&E::RegistryError {
            envelope,
            url: "u".into()
        }));
        assert!(!refused_credentials(&E::ImageManifestNotFoundError(
            "x".into()
        )));
    }
}
