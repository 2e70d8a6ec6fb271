//! Manifests and image indexes, fetched with a cap.
//!
//! Why not oci-client's `pull_manifest*`: in 0.18 they read the response
//! with `Response::bytes()`, whole, before anything can look at its size,
//! so a hostile registry could make the daemon buffer gigabytes (and
//! `pull_manifest_and_config` reads the config the same way). oci-client
//! has no streaming manifest API, so the manifest request is made here:
//! Content-Length is checked first, then the body is read chunk by chunk
//! and refused at [`MAX_DOCUMENT_BYTES`]. Authentication stays with
//! oci-client (`Client::auth`, whose token its blob pulls reuse), and so do
//! the platform resolver and the manifest types.

use crate::content::Digest;
use crate::limits::{Exhausted, MAX_DOCUMENT_BYTES};
use oci_client::client::linux_amd64_resolver;
use oci_client::errors::OciEnvelope;
use oci_client::manifest::{
    OciImageManifest, OciManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use thiserror::Error;

/// Media types a manifest request accepts, as oci-client's do.
const ACCEPTED: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How much of an error response is read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// Why a manifest could not be had.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The registry refused who we are.
    #[error("{url}: {why}")]
    Unauthorized {
        /// What was asked for.
        url: String,
        /// What the registry said.
        why: String,
    },
    /// The registry failed or could not be reached.
    #[error("{url}: {why}")]
    Registry {
        /// What was asked for.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// What it served is not a manifest we can use.
    #[error("{0}")]
    Invalid(String),
    /// It is too large.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

/// Credentials for the manifest requests.
#[derive(Debug, Clone)]
pub enum Authorization {
    /// None needed (or none we have).
    Anonymous,
    /// HTTP basic.
    Basic(String, String),
    /// A bearer token from the registry's token service.
    Bearer(String),
}

/// Fetches manifests of one repository from one endpoint.
pub struct ManifestFetcher {
    http: reqwest::Client,
    /// `scheme://host[:port]/v2/<repository>/manifests/`.
    base: String,
    auth: Authorization,
}

impl ManifestFetcher {
    /// A fetcher for `repository` at `scheme://registry`, trusting the
    /// extra PEM roots in `ca_pem` as oci-client's client does.
    pub fn new(
        scheme: &str,
        registry: &str,
        repository: &str,
        ca_pem: Option<&[u8]>,
        auth: Authorization,
    ) -> Result<ManifestFetcher, ManifestError> {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ManifestError::Invalid(format!("CA bundle: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ManifestError::Invalid(format!("HTTP client: {e}")))?;
        Ok(ManifestFetcher {
            http,
            base: format!("{scheme}://{registry}/v2/{repository}/manifests/"),
            auth,
        })
    }

    /// The raw manifest or index `reference` (a tag or a digest) names,
    /// at most [`MAX_DOCUMENT_BYTES`] of it.
    pub async fn get(&self, reference: &str) -> Result<Vec<u8>, ManifestError> {
        let url = format!("{}{reference}", self.base);
        let request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPTED.join(", "));
        let request = match &self.auth {
            Authorization::Anonymous => request,
            Authorization::Basic(u, p) => request.basic_auth(u, Some(p)),
            Authorization::Bearer(t) => request.bearer_auth(t),
        };
        let registry = |e: reqwest::Error| ManifestError::Registry {
            url: url.clone(),
            why: e.to_string(),
        };
        let mut response = request.send().await.map_err(registry)?;
        let status = response.status();
        if !status.is_success() {
            let body = read_capped(&mut response, MAX_ERROR_BODY, true)
                .await
                .unwrap_or_default();
            return Err(refusal(&url, status, &body));
        }
        read_capped(&mut response, MAX_DOCUMENT_BYTES, false)
            .await
            .map_err(|e| match e {
                Capped::Over => Exhausted::DocumentTooLarge {
                    what: "manifest",
                    limit: MAX_DOCUMENT_BYTES,
                }
                .into(),
                Capped::Http(e) => registry(e),
            })
    }
}

enum Capped {
    Over,
    Http(reqwest::Error),
}

/// Reads at most `limit` bytes of `response`; more is an error, unless
/// `truncate` (error bodies, read only for their message).
async fn read_capped(
    response: &mut reqwest::Response,
    limit: u64,
    truncate: bool,
) -> Result<Vec<u8>, Capped> {
    // Refuse before reading when the registry says outright it is too big.
    if !truncate && response.content_length().is_some_and(|n| n > limit) {
        return Err(Capped::Over);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Http)? {
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(body.len());
        if chunk.len() > room {
            if truncate {
                body.extend_from_slice(&chunk[..room]);
                break;
            }
            return Err(Capped::Over);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error for a refused request: the OCI error envelope's codes tell
/// refused credentials from other failures.
fn refusal(url: &str, status: reqwest::StatusCode, body: &[u8]) -> ManifestError {
    let envelope: Option<OciEnvelope> = serde_json::from_slice(body).ok();
    let text = match &envelope {
        Some(env) => env
            .errors
            .iter()
            .map(|e| format!("{:?}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        None => String::from_utf8_lossy(body).chars().take(512).collect(),
    };
    let why = format!("HTTP {status}: {text}");
    let denied = envelope.is_some_and(|env| {
        env.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::Unauthorized
                    | oci_client::errors::OciErrorCode::Denied
            )
        })
    });
    if status == reqwest::StatusCode::UNAUTHORIZED || denied {
        ManifestError::Unauthorized {
            url: url.to_string(),
            why,
        }
    } else {
        ManifestError::Registry {
            url: url.to_string(),
            why,
        }
    }
}

/// Parses a manifest or index, refusing what oci-client would refuse:
/// a schema other than 2, or a media type that is not a manifest's.
fn parse(body: &[u8]) -> Result<OciManifest, ManifestError> {
    let m: OciManifest = serde_json::from_slice(body)
        .map_err(|e| ManifestError::Invalid(format!("manifest is not valid: {e}")))?;
    let (schema, media_type) = match &m {
        OciManifest::Image(i) => (i.schema_version, i.media_type.as_deref()),
        OciManifest::ImageIndex(i) => (i.schema_version, i.media_type.as_deref()),
    };
    if schema != 2 {
        return Err(ManifestError::Invalid(format!(
            "manifest schema version {schema} is not supported"
        )));
    }
    if let Some(t) = media_type.filter(|t| !ACCEPTED.contains(t)) {
        return Err(ManifestError::Invalid(format!(
            "unsupported manifest media type {t:?}"
        )));
    }
    Ok(m)
}

/// What a reference resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The image manifest (for linux/amd64 when the reference names an
    /// index).
    pub manifest: OciImageManifest,
    /// The digest of what the reference names (the index, if it is one):
    /// the repo digest, as containerd reports it.
    pub digest: Digest,
}

/// Resolves `reference` (a tag or digest) to an image manifest, checking
/// what it names against `pinned` and an index's choice against the
/// digest the index gives for it.
pub async fn resolve(
    fetcher: &ManifestFetcher,
    reference: &str,
    pinned: Option<&str>,
) -> Result<Resolved, ManifestError> {
    let top = fetcher.get(reference).await?;
    let digest = Digest::of(&top);
    if let Some(p) = pinned.filter(|p| *p != digest.to_string()) {
        return Err(ManifestError::Invalid(format!(
            "registry served manifest {digest}, not the pinned {p}"
        )));
    }
    let index = match parse(&top)? {
        OciManifest::Image(manifest) => return Ok(Resolved { manifest, digest }),
        OciManifest::ImageIndex(index) => index,
    };
    let chosen = linux_amd64_resolver(&index.manifests).ok_or_else(|| {
        ManifestError::Invalid("the image index has no linux/amd64 manifest".into())
    })?;
    // Parsed before it goes into a URL: only a well-formed sha256 digest.
    let chosen = Digest::parse(&chosen).map_err(|e| ManifestError::Invalid(e.to_string()))?;
    let body = fetcher.get(&chosen.to_string()).await?;
    if Digest::of(&body) != chosen {
        return Err(ManifestError::Invalid(format!(
            "registry served a manifest that is not {chosen}"
        )));
    }
    match parse(&body)? {
        OciManifest::Image(manifest) => Ok(Resolved { manifest, digest }),
        OciManifest::ImageIndex(_) => Err(ManifestError::Invalid(format!(
            "{chosen} is an image index inside an image index"
        ))),
    }
}
