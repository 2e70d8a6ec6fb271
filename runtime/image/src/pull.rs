//! Pulling an image from a registry into the content store: manifest
//! (image indexes resolve to linux/amd64), config, then each layer,
//! verified by digest, unpacked once by chain ID. Mirrors are tried in
//! order before the registry itself.

use crate::content::{ContentError, ContentStore, Digest};
use crate::reference::Reference;
use crate::registry::{endpoints, Endpoint, RegistryConfig};
use crate::unpack::Limits;
use oci_client::client::{
    linux_amd64_resolver, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use std::collections::BTreeMap;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

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
    /// Storing or unpacking failed.
    #[error(transparent)]
    Content(#[from] ContentError),
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
            Err(e) => return Err(e),
        }
    }
    Err(PullError::Registry {
        reference: reference.to_string(),
        last,
    })
}

/// True when the registry refused who we are (missing or wrong
/// credentials, or no access), as opposed to failing.
fn refused_credentials(e: &oci_client::errors::OciDistributionError) -> bool {
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

async fn pull_from(
    store: &ContentStore,
    reference: &Reference,
    creds: Option<&Credentials>,
    ep: &Endpoint,
    limits: &Limits,
) -> Result<PulledImage, PullError> {
    let (host, plain_http) = host_of_url(&ep.url);
    let mut extra_root_certificates = Vec::new();
    if let Some(ca) = &ep.ca_file {
        // A configured CA that cannot be read is an error, not a silent
        // fallback to the system roots.
        let data = std::fs::read(ca).map_err(|e| PullError::Invalid {
            reference: reference.to_string(),
            why: format!("reading CA bundle {}: {e}", ca.display()),
        })?;
        extra_root_certificates.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    let client = Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        extra_root_certificates,
        ..Default::default()
    });
    let oref = match (&reference.tag, &reference.digest) {
        (_, Some(d)) => oci_client::Reference::with_digest(
            host.to_string(),
            reference.repository.clone(),
            d.clone(),
        ),
        (Some(t), None) => oci_client::Reference::with_tag(
            host.to_string(),
            reference.repository.clone(),
            t.clone(),
        ),
        (None, None) => oci_client::Reference::with_tag(
            host.to_string(),
            reference.repository.clone(),
            "latest".into(),
        ),
    };
    let auth = match creds {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let name = reference.to_string();
    let registry_err = |e: oci_client::errors::OciDistributionError| {
        let text = e.to_string();
        if refused_credentials(&e) {
            PullError::Unauthorized {
                reference: name.clone(),
                why: text,
            }
        } else {
            PullError::Registry {
                reference: name.clone(),
                last: text,
            }
        }
    };
    let (manifest, manifest_digest, config) = client
        .pull_manifest_and_config(&oref, &auth)
        .await
        .map_err(registry_err)?;
    let invalid = |why: String| PullError::Invalid {
        reference: name.clone(),
        why,
    };
    if let Some(pinned) = &reference.digest {
        if &manifest_digest != pinned {
            return Err(invalid(format!(
                "registry served manifest {manifest_digest}, not the pinned {pinned}"
            )));
        }
    }
    let config_digest = Digest::parse(&manifest.config.digest)?;
    store.put_blob(
        &config_digest,
        Some(manifest.config.size as u64),
        config.as_bytes(),
    )?;
    let parsed: serde_json::Value =
        serde_json::from_str(&config).map_err(|e| invalid(format!("config is not JSON: {e}")))?;
    let diff_ids: Vec<Digest> = parsed["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| invalid("config has no rootfs.diff_ids".into()))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ContentError::BadDigest(v.to_string()))
                .and_then(Digest::parse)
        })
        .collect::<Result<_, _>>()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(invalid(format!(
            "{} layers but {} diff IDs",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    let mut chain = Vec::with_capacity(diff_ids.len());
    let mut blobs = vec![config_digest.clone()];
    let mut size = manifest.config.size.max(0) as u64;
    for (layer, diff_id) in manifest.layers.iter().zip(&diff_ids) {
        let blob = Digest::parse(&layer.digest)?;
        blobs.push(blob.clone());
        size += layer.size.max(0) as u64;
        if !store.has_blob(&blob) {
            // Stream to a scratch file, then verify it into the store.
            let scratch = store.scratch_path();
            let result = async {
                let mut f = tokio::fs::File::create(&scratch)
                    .await
                    .map_err(|e| invalid(format!("scratch file: {e}")))?;
                client
                    .pull_blob(&oref, layer, &mut f)
                    .await
                    .map_err(registry_err)?;
                f.flush()
                    .await
                    .map_err(|e| invalid(format!("scratch file: {e}")))?;
                drop(f);
                let file = std::fs::File::open(&scratch)
                    .map_err(|e| invalid(format!("scratch file: {e}")))?;
                store.put_blob(
                    &blob,
                    Some(layer.size.max(0) as u64),
                    std::io::BufReader::new(file),
                )?;
                Ok::<(), PullError>(())
            }
            .await;
            let _ = std::fs::remove_file(&scratch);
            result?;
        }
        let parent = chain.last();
        let chain_id = Digest::chain(parent, diff_id);
        let (store2, blob2, media, diff2, chain2, limits2) = (
            store.clone(),
            blob.clone(),
            layer.media_type.clone(),
            diff_id.clone(),
            chain_id.clone(),
            *limits,
        );
        tokio::task::spawn_blocking(move || {
            store2.unpack(&blob2, &media, &diff2, &chain2, &limits2)
        })
        .await
        .map_err(|e| invalid(format!("unpack task: {e}")))??;
        chain.push(chain_id);
    }
    Ok(PulledImage {
        id: config_digest,
        manifest_digest,
        config: config.into_bytes(),
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
