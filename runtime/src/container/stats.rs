//! Cgroup statistics of containers, read from their sandbox's agent under
//! a deadline, and filtered: the reply is the guest's word.

use super::{ContainerError, Containers};
use crate::lock::lock;
use std::collections::HashMap;
use std::time::Duration;
use vmcri_proto::agent::v1 as pb;

impl Containers {
    /// Cgroup statistics of a ready sandbox's containers together, and of
    /// each. The agent's reply is the guest's word: IDs it names that are
    /// not this pod's (another pod's, made-up ones) are dropped.
    pub async fn sandbox_stats(
        &self,
        sandbox_id: &str,
    ) -> Result<(pb::CgroupStats, HashMap<String, pb::CgroupStats>), ContainerError> {
        let own: Vec<String> = lock(&self.entries)
            .values()
            .filter_map(|e| {
                let r = lock(&e.record);
                (r.sandbox_id == sandbox_id).then(|| r.id.clone())
            })
            .collect();
        self.within_stats_deadline(sandbox_id, async {
            let (_, agent) = self.ready_sandbox(sandbox_id).await?;
            let total = agent.sandbox_stats().await?;
            let each = agent.container_stats(own.clone()).await?;
            Ok((total, only(each, &own)))
        })
        .await
    }

    /// Cgroup statistics of containers `ids` of a ready sandbox; the
    /// reply keeps only those IDs (see [`Containers::sandbox_stats`]).
    pub async fn stats(
        &self,
        sandbox_id: &str,
        ids: Vec<String>,
    ) -> Result<HashMap<String, pb::CgroupStats>, ContainerError> {
        self.within_stats_deadline(sandbox_id, async {
            let (_, agent) = self.ready_sandbox(sandbox_id).await?;
            let stats = agent.container_stats(ids.clone()).await?;
            Ok(only(stats, &ids))
        })
        .await
    }

    /// Runs a stats query under `[agent] stats_timeout_secs`.
    async fn within_stats_deadline<T>(
        &self,
        sandbox_id: &str,
        f: impl std::future::Future<Output = Result<T, ContainerError>>,
    ) -> Result<T, ContainerError> {
        let after = Duration::from_secs(self.sandboxes.config().agent.stats_timeout_secs);
        tokio::time::timeout(after, f).await.unwrap_or_else(|_| {
            Err(ContainerError::Timeout(format!(
                "pod sandbox {sandbox_id} gave no stats within {after:?}"
            )))
        })
    }
}

/// Keeps the stats of `ids` only: an agent's reply is the guest's word,
/// and stats it gives for other pods' containers (or made-up ones) must
/// not reach, or overwrite, anyone's figures.
fn only(
    mut stats: HashMap<String, pb::CgroupStats>,
    ids: &[String],
) -> HashMap<String, pb::CgroupStats> {
    stats.retain(|id, _| ids.contains(id));
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_reply_keeps_only_the_pods_own_containers() {
        let cpu = |n| pb::CgroupStats {
            cpu_usage_ns: n,
            ..Default::default()
        };
        let reply: HashMap<String, pb::CgroupStats> = [
            ("mine".to_string(), cpu(1)),
            ("other-pods".to_string(), cpu(999)),
            ("made-up".to_string(), cpu(7)),
        ]
        .into();
        let kept = only(reply, &["mine".to_string(), "absent".to_string()]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept["mine"].cpu_usage_ns, 1);
    }
}
