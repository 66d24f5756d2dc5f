//! The suite's own RabbitMQ node: its own node name, ports, data and log directories, Erlang
//! cookie and port mapper, so it can be killed and restarted without touching any other broker
//! on the machine.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::{self, Deadline};

/// Debian's `/usr/sbin/rabbitmq-server` is a wrapper that switches to the system node's user
/// and directory, so the script it wraps is preferred. `explicit` (a command-line option) wins.
pub fn find_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.is_file() {
        return Ok(debian.to_owned());
    }
    std::env::split_paths(&support::path_env())
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|path| path.is_file())
        .context("no rabbitmq-server found; install RabbitMQ or pass --rabbitmq-server")
}

/// How long a node may take to start; Erlang boots slowly on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A RabbitMQ node the suite started and may kill.
pub struct RabbitNode {
    server: PathBuf,
    dir: PathBuf,
    node_name: String,
    amqp_port: u16,
    dist_port: u16,
    epmd_port: u16,
    /// Whether this node stops the port mapper when dropped: a cluster's nodes share one, which
    /// the cluster stops once all of them are gone.
    owns_epmd: bool,
    child: Option<Child>,
}

/// Who a node is: its name and the port mapper it registers with. Cluster members share the
/// port mapper and the Erlang cookie.
pub struct Identity {
    pub node_name: String,
    pub epmd_port: u16,
    /// Written to the node's `.erlang.cookie` before the first start; `None` lets Erlang make one.
    pub cookie: Option<String>,
}

impl RabbitNode {
    /// Starts a node whose files all live under `dir`, and waits until it takes connections.
    pub async fn start(server: &Path, dir: &Path) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let identity = Identity {
            node_name: format!("faults-{}@localhost", &suffix[..8]),
            epmd_port: support::spare_port()?,
            cookie: None,
        };
        let mut node = Self::prepare(server, dir, identity, true)?;
        node.launch().await?;
        Ok(node)
    }

    /// Writes a node's files under `dir` without starting it (see [`RabbitNode::launch`]).
    pub fn prepare(
        server: &Path,
        dir: &Path,
        identity: Identity,
        owns_epmd: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // No plugins at all (no management UI), and a config file of our own, so nothing in
        // the machine's RabbitMQ configuration applies to this node.
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let amqp_port = support::spare_port()?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{amqp_port}\n"),
        )?;
        if let Some(cookie) = &identity.cookie {
            let path = dir.join(".erlang.cookie");
            std::fs::write(&path, cookie)?;
            // Erlang refuses a cookie file that others can read.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
        }
        Ok(Self {
            server: server.to_owned(),
            dir: dir.to_owned(),
            node_name: identity.node_name,
            amqp_port,
            dist_port: support::spare_port()?,
            epmd_port: identity.epmd_port,
            owns_epmd,
            child: None,
        })
    }

    /// The Erlang node name, `name@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Whether the node's processes are running (it has not been killed or stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs `rabbitmqctl` (the script next to the start script) against this node, with the
    /// node's cookie and port mapper, and returns its standard output.
    pub async fn ctl(&self, arguments: &[&str]) -> anyhow::Result<String> {
        let ctl = self.server.with_file_name("rabbitmqctl");
        let output = Command::new(&ctl)
            .env_clear()
            .env("PATH", support::path_env())
            .env("HOME", &self.dir)
            .env("LANG", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .arg("-n")
            .arg(&self.node_name)
            .args(arguments)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", ctl.display()))?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl -n {} {} failed ({}): {}",
                self.node_name,
                arguments.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// SIGKILL to the node's process group: the broker gets no chance to flush or say goodbye.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(Signal::SIGKILL).await
    }

    /// SIGTERM: the node shuts down cleanly, writing out everything it holds.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(Signal::SIGTERM).await
    }

    /// Signals the node's process group and waits until the Erlang VM is gone and the port
    /// closed, so a restart never meets the old node.
    async fn signal_and_wait(&mut self, signal: Signal) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let vm = self.vm_pid();
        signal_group(&child, signal);
        child
            .wait()
            .await
            .context("waiting for the node's start script")?;
        let deadline = Deadline::after(Duration::from_secs(60));
        while let Some(vm) = vm
            && Path::new(&format!("/proc/{vm}")).exists()
        {
            deadline.check(|| format!("the RabbitMQ node to stop after {signal}"))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_until_port_closed().await
    }

    /// The Erlang VM's process id, which the node writes to its pid file once started.
    fn vm_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("rabbitmq.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts the node again on the same ports and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.launch().await
    }

    /// Messages ready in `queue` (not counting those delivered and not yet acknowledged), through
    /// a passive declare, which fails if the queue does not exist.
    pub async fn ready_messages(&self, queue: &str) -> anyhow::Result<u32> {
        let connection = Connection::connect(&self.amqp_url(), ConnectionProperties::default())
            .await
            .context("connecting to the suite's RabbitMQ node")?;
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {queue}"))?;
        let _ = connection.close(200, "done".into()).await;
        Ok(declared.message_count())
    }

    /// Sets the node's memory high watermark as a fraction of the machine's memory
    /// (`rabbitmqctl set_vm_memory_high_watermark`). A tiny one raises the memory alarm, under
    /// which the node blocks every connection that publishes; 0.4 is the default again.
    pub async fn set_memory_high_watermark(&self, fraction: f64) -> anyhow::Result<()> {
        self.ctl(&["set_vm_memory_high_watermark", &fraction.to_string()])
            .await
            .map(|_| ())
    }

    /// Starts the node's processes and waits until it takes connections.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.out"))?;
        let dir = &self.dir;
        let mut command = Command::new(&self.server);
        command
            .env_clear()
            .env("PATH", support::path_env())
            // The Erlang cookie lives in $HOME: our own, so no other node's is read or written.
            .env("HOME", dir)
            .env("LANG", "C.UTF-8")
            .env("RABBITMQ_NODENAME", &self.node_name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so one signal reaches the start script and the VM.
            .process_group(0)
            .kill_on_drop(true);
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.server.display()))?,
        );
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Deadline::after(START_TIMEOUT);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "RabbitMQ node {} exited at start ({status}); see {}",
                    self.node_name,
                    self.dir.join("server.out").display()
                );
            }
            let connected =
                Connection::connect(&self.amqp_url(), ConnectionProperties::default()).await;
            if let Ok(connection) = connected {
                let _ = connection.close(200, "ready".into()).await;
                return Ok(());
            }
            deadline.check(|| format!("RabbitMQ node {} to take connections", self.node_name))?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_until_port_closed(&self) -> anyhow::Result<()> {
        let deadline = Deadline::after(Duration::from_secs(30));
        while tokio::net::TcpStream::connect(("127.0.0.1", self.amqp_port))
            .await
            .is_ok()
        {
            deadline.check(|| "the killed RabbitMQ node to close its port".to_owned())?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let vm = self.vm_pid();
        if let Some(child) = self.child.take() {
            signal_group(&child, Signal::SIGKILL);
        }
        let deadline = Deadline::after(Duration::from_secs(15));
        while let Some(vm) = vm
            && Path::new(&format!("/proc/{vm}")).exists()
            && !deadline.passed()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.owns_epmd {
            stop_epmd(self.epmd_port, &deadline);
        }
    }
}

/// The first node started a port mapper daemon on `port`, which outlives the nodes and only
/// stops on request once no node is registered with it any more, so it is asked until then.
pub fn stop_epmd(port: u16, deadline: &Deadline) {
    while !deadline.passed() {
        let stopped = std::process::Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if stopped {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal_group(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // The group id is the start script's pid, as it was spawned as a group leader.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}
