//! The suite's own three-node RabbitMQ cluster: three [`RabbitNode`]s on this machine sharing an
//! Erlang cookie and a port mapper of their own (never the machine's), each with its own node
//! name, AMQP and distribution ports and data directory, joined with `rabbitmqctl join_cluster`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::RngCore;

use crate::rabbit::{Identity, RabbitNode, stop_epmd};
use crate::support::{self, Deadline};

/// How long the cluster may take to see all its nodes running after a join or a restart.
const FORM_TIMEOUT: Duration = Duration::from_secs(180);

/// A RabbitMQ cluster the suite started and may kill nodes of.
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
    epmd_port: u16,
}

impl RabbitCluster {
    /// Starts `size` nodes under `dir`, joins the others to the first, and waits until every
    /// node sees all of them running.
    pub async fn start(server: &Path, dir: &Path, size: usize) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut secret = [0_u8; 20];
        rand::rng().fill_bytes(&mut secret);
        let cookie: String = secret.iter().map(|byte| format!("{byte:02X}")).collect();
        let epmd_port = support::spare_port()?;
        let mut cluster = Self {
            nodes: Vec::with_capacity(size),
            epmd_port,
        };
        for index in 1..=size {
            let identity = Identity {
                node_name: format!("faults-{}-{index}@localhost", &suffix[..8]),
                epmd_port,
                cookie: Some(cookie.clone()),
            };
            let mut node =
                RabbitNode::prepare(server, &dir.join(format!("node-{index}")), identity, false)?;
            node.launch().await?;
            cluster.nodes.push(node);
        }
        let first = cluster.nodes[0].node_name().to_owned();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
        }
        cluster.await_all_running().await?;
        Ok(cluster)
    }

    /// `AMQP_URL` for the binaries: every node's URL, separated by commas.
    pub fn amqp_urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RabbitNode::amqp_url).collect();
        urls.join(",")
    }

    /// The nodes, in the order they were started.
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// A running node, to ask things of.
    pub fn running(&self) -> anyhow::Result<&RabbitNode> {
        self.nodes
            .iter()
            .find(|node| node.is_running())
            .context("no RabbitMQ node is running")
    }

    /// The index of the node that leads `queue` (a quorum queue), as a running node reports it.
    pub async fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        let deadline = Deadline::after(FORM_TIMEOUT);
        loop {
            let listing = self
                .running()?
                .ctl(&["list_queues", "name", "leader", "--formatter", "json", "-q"])
                .await?;
            let leader = leader_in(&listing, queue)?;
            if let Some(index) = leader.and_then(|leader| {
                self.nodes
                    .iter()
                    .position(|node| node.node_name() == leader && node.is_running())
            }) {
                return Ok(index);
            }
            // Just after a kill, the queue may not have elected its next leader yet.
            deadline.check(|| format!("{queue} to have a running leader"))?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// SIGKILL to node `index`.
    pub async fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].kill().await
    }

    /// Starts node `index` again on its ports and data; it rejoins the cluster on its own.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].restart().await?;
        self.await_all_running().await
    }

    /// Stops each node cleanly and starts it again, one at a time, so the cluster stays up. On
    /// RabbitMQ 3.10 this writes out the registry of quorum queue members that a node keeps in
    /// memory (see the README), so queues declared just before survive a SIGKILL.
    pub async fn rolling_restart(&mut self) -> anyhow::Result<()> {
        for index in 0..self.nodes.len() {
            self.nodes[index].stop().await?;
            self.nodes[index].launch().await?;
            self.await_all_running().await?;
        }
        Ok(())
    }

    /// Waits until a running node reports every node of the cluster running.
    async fn await_all_running(&self) -> anyhow::Result<()> {
        let count = self.nodes.len().to_string();
        let deadline = Deadline::after(FORM_TIMEOUT);
        loop {
            let waited = self
                .running()?
                .ctl(&["await_online_nodes", &count, "--timeout", "5000"])
                .await;
            match waited {
                Ok(_) => return Ok(()),
                Err(error) if deadline.passed() => {
                    return Err(error.context(format!("{count} nodes to be running")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // Each node waits for its VM to be gone; then the shared port mapper has no node left.
        self.nodes.clear();
        stop_epmd(self.epmd_port, &Deadline::after(Duration::from_secs(15)));
    }
}

/// The `leader` of `queue` in the JSON that `rabbitmqctl list_queues name leader --formatter
/// json` prints (an array of objects); `None` while it has none.
fn leader_in(listing: &str, queue: &str) -> anyhow::Result<Option<String>> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(listing.trim())
        .with_context(|| format!("reading the queue listing: {listing}"))?;
    let Some(row) = rows.iter().find(|row| row["name"] == queue) else {
        bail!("queue {queue} is not in the listing");
    };
    Ok(row["leader"]
        .as_str()
        .filter(|leader| !leader.is_empty())
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_read_from_the_listing() {
        let listing = r#"[
{"name":"a.clerk.events.dead","leader":"n-2@localhost"},
{"name":"a.clerk.events.worker","leader":"n-3@localhost"}
]"#;
        assert_eq!(
            leader_in(listing, "a.clerk.events.worker").expect("listed"),
            Some("n-3@localhost".to_owned())
        );
        assert!(leader_in(listing, "b").is_err());
    }
}
