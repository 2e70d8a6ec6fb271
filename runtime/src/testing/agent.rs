//! An in-memory `vmcri-agent`: the whole agent API served on a Unix
//! socket, for the daemon's unit tests to drive through the real client.
//!
//! It follows the real agent (agent/src/service.rs and its engine): the
//! same checks, status codes and lifecycle. What it cannot run it fakes:
//! a container's init runs until [`FakeAgent::exit`], a signal or removal,
//! and writes what [`FakeAgent::emit`] gives it; an exec does what the
//! exec script says ([`default_script`] unless one is set).

use oci_spec::runtime::Spec;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use vmcri_proto::agent::v1 as pb;
use vmcri_proto::agent::v1::agent_server::{Agent, AgentServer};
use vmcri_proto::agent::v1::output_chunk::Stream as Out;
use vmcri_proto::agent::v1::wait_process_response::Reason;

type Reply<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type ExecScript = Arc<dyn Fn(&[String]) -> Script + Send + Sync>;

const SIGKILL: u32 = libc::SIGKILL as u32;
const SIGTERM: u32 = libc::SIGTERM as u32;

/// What a faked exec does: writes its output at once, then exits with
/// `exit_code` after `runs_for`; with `echo_stdin` it instead copies its
/// stdin to stdout and exits at stdin's end, as `cat` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    /// Written to stdout when it starts.
    pub stdout: Vec<u8>,
    /// Written to stderr when it starts.
    pub stderr: Vec<u8>,
    /// Its exit code.
    pub exit_code: i32,
    /// How long it runs (`Duration::MAX`: until a signal ends it).
    pub runs_for: Duration,
    /// It is `cat`.
    pub echo_stdin: bool,
}

/// The exec script a [`FakeAgent`] starts with: `true`, `false`, `cat`,
/// `echo` and `sleep N` act as in coreutils; anything else prints its
/// whole argv and exits 0.
pub fn default_script(args: &[String]) -> Script {
    let program = args
        .first()
        .map_or("", |a| a.rsplit('/').next().unwrap_or(a));
    let line = |words: &[String]| format!("{}\n", words.join(" ")).into_bytes();
    let mut s = Script::default();
    match program {
        "true" => {}
        "false" => s.exit_code = 1,
        "cat" => s.echo_stdin = true,
        "echo" => s.stdout = line(&args[1..]),
        "sleep" => match args.get(1).and_then(|a| a.parse::<f64>().ok()) {
            // `sleep infinity` does not fit a Duration: it sleeps for good.
            Some(n) if n >= 0.0 => {
                s.runs_for = Duration::try_from_secs_f64(n).unwrap_or(Duration::MAX)
            }
            _ => (s.stderr, s.exit_code) = (b"sleep: invalid time interval\n".to_vec(), 1),
        },
        _ => s.stdout = line(args),
    }
    s
}

use vmcri_proto::now_ns;

fn ok<T>(reply: T) -> Reply<T> {
    Ok(Response::new(reply))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked holding it must not take the server down too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("container {id} not found in the sandbox"))
}

/// The real agent's rule: its IDs become directory names.
fn check_id(kind: &str, id: &str) -> Result<(), Status> {
    let char_ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if (1..=128).contains(&id.len()) && !id.starts_with('.') && id.bytes().all(char_ok) {
        return Ok(());
    }
    let why =
        format!("invalid {kind} ID {id:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'");
    Err(Status::invalid_argument(why))
}

fn process_ref(p: Option<pb::ProcessRef>) -> Result<pb::ProcessRef, Status> {
    p.filter(|p| !p.container_id.is_empty())
        .ok_or_else(|| Status::invalid_argument("process.container_id is required"))
}

/// Runs `fut` unless the fake stops first: calls in flight end as they
/// would when a VM dies, and the server can then finish.
async fn unless_stopped<T>(
    stopped: &watch::Sender<bool>,
    fut: impl Future<Output = T>,
) -> Result<T, Status> {
    let mut stopped = stopped.subscribe();
    tokio::select! {
        v = fut => Ok(v),
        _ = stopped.wait_for(|s| *s) => Err(Status::unavailable("the agent has stopped")),
    }
}

/// A process's life as its readers and waiters see it.
#[derive(Default)]
struct Life {
    /// All it wrote, offsets consecutive from 0: readers may resume anywhere.
    output: Vec<pb::OutputChunk>,
    len: u64,
    stdin_open: bool,
    /// It is `cat`: exits with this code at stdin's end.
    echo_stdin: Option<i32>,
    /// 0 until started, and for execs (as in the real agent).
    started_at_ns: i64,
    exit: Option<pb::WaitProcessResponse>,
}

/// A container's init or an exec.
#[derive(Clone)]
struct Proc {
    pid: u32,
    tty: bool,
    life: watch::Sender<Life>,
}

impl Proc {
    fn new(pid: u32, tty: bool, stdin: bool, echo_stdin: Option<i32>) -> Proc {
        let life = Life {
            stdin_open: stdin,
            echo_stdin,
            ..Life::default()
        };
        Proc {
            pid,
            tty,
            life: watch::Sender::new(life),
        }
    }

    fn exited(&self) -> bool {
        self.life.borrow().exit.is_some()
    }

    /// Appends output; none after the end, when its pipes are closed.
    fn emit(&self, stream: Out, data: &[u8]) {
        // A terminal has a single stream.
        let stream = (if self.tty { Out::Stdout } else { stream }) as i32;
        self.life.send_if_modified(|l| {
            if l.exit.is_some() || data.is_empty() {
                return false;
            }
            // In pieces no bigger than the real agent's reads.
            let timestamp_ns = now_ns();
            for piece in data.chunks(64 << 10) {
                let offset = l.len;
                l.len += piece.len() as u64;
                l.output.push(pb::OutputChunk {
                    stream,
                    data: piece.to_vec(),
                    timestamp_ns,
                    offset,
                });
            }
            true
        });
    }

    /// Ends it with `code`, killed by `signal` if nonzero; once only.
    fn end(&self, exit_code: i32, signal: u32) {
        self.life.send_if_modified(|l| {
            if l.exit.is_some() {
                return false;
            }
            let reason = (if signal == 0 {
                Reason::Exited
            } else {
                Reason::Signaled
            }) as i32;
            let (started_at_ns, finished_at_ns) = (l.started_at_ns, now_ns());
            let exit = pb::WaitProcessResponse {
                exit_code,
                signal,
                reason,
                started_at_ns,
                finished_at_ns,
            };
            l.exit = Some(exit);
            true
        });
    }

    /// SIGKILL ends it, SIGTERM too unless its program ignores it; the
    /// program handles any other signal and carries on.
    fn signal(&self, signal: u32, ignores_sigterm: bool) {
        if signal == SIGKILL || (signal == SIGTERM && !ignores_sigterm) {
            self.end(128 + i32::try_from(signal).unwrap_or(0), signal);
        }
    }

    async fn wait(&self) -> pb::WaitProcessResponse {
        let mut life = self.life.subscribe();
        // Cannot fail: `self.life` is a sender, so the channel stays open.
        let ended = life.wait_for(|l| l.exit.is_some()).await;
        ended.ok().and_then(|l| l.exit).unwrap_or_default()
    }

    /// Takes stdin: `cat` echoes it; `eof` closes stdin, which ends `cat`.
    fn write_stdin(&self, data: &[u8], eof: bool) -> Result<(), Status> {
        let (open, echo) = {
            let l = self.life.borrow();
            (l.stdin_open && l.exit.is_none(), l.echo_stdin)
        };
        if !open {
            return Err(Status::failed_precondition(
                "stdin: the process has no open stdin",
            ));
        }
        if echo.is_some() {
            self.emit(Out::Stdout, data);
        }
        if eof {
            self.life.send_modify(|l| l.stdin_open = false);
            if let Some(code) = echo {
                self.end(code, 0);
            }
        }
        Ok(())
    }
}

struct Container {
    init: Proc,
    execs: HashMap<String, Proc>,
    resources: Option<pb::Resources>,
}

impl Container {
    fn running(&self) -> bool {
        let l = self.init.life.borrow();
        l.started_at_ns != 0 && l.exit.is_none()
    }

    /// Plausible cgroup numbers: a tenth of a CPU while it runs, a few MiB
    /// of memory, one PID per live process.
    fn stats(&self) -> pb::CgroupStats {
        let (now, l) = (now_ns(), self.init.life.borrow());
        let end = l.exit.as_ref().map_or(now, |e| e.finished_at_ns);
        let ran_ns = if l.started_at_ns == 0 {
            0
        } else {
            end - l.started_at_ns
        };
        let live =
            self.execs.values().filter(|p| !p.exited()).count() + usize::from(l.exit.is_none());
        pb::CgroupStats {
            cpu_usage_ns: ran_ns.max(0).unsigned_abs() / 10,
            memory_usage_bytes: 8 << 20,
            memory_working_set_bytes: 6 << 20,
            memory_rss_bytes: 4 << 20,
            memory_page_faults: 1000,
            memory_major_page_faults: 2,
            pids_current: live as u64,
            oom_kills: 0,
            timestamp_ns: now,
        }
    }
}

#[derive(Default)]
struct State {
    calls: Vec<String>,
    failures: HashMap<String, VecDeque<Code>>,
    containers: HashMap<String, Container>,
    ignore_sigterm: HashSet<String>,
    last_pid: u32,
}

/// The service; the test's [`FakeAgent`] shares it with the server.
struct Shared {
    state: Mutex<State>,
    script: Mutex<ExecScript>,
    /// Set when the fake stops: the server stops, and calls in flight end.
    stopped: watch::Sender<bool>,
    booted: Instant,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Records a call (failing it if a test asked for that); its request.
    fn enter<T>(&self, rpc: &str, req: Request<T>) -> Result<T, Status> {
        let mut s = self.state();
        s.calls.push(rpc.to_string());
        match s.failures.get_mut(rpc).and_then(VecDeque::pop_front) {
            Some(code) => Err(Status::new(
                code,
                format!("{rpc} failed by FakeAgent::fail_next"),
            )),
            None => Ok(req.into_inner()),
        }
    }

    fn init(&self, id: &str) -> Result<Proc, Status> {
        let s = self.state();
        s.containers
            .get(id)
            .map(|c| c.init.clone())
            .ok_or_else(|| not_found(id))
    }

    fn lookup(&self, p: &pb::ProcessRef) -> Result<Proc, Status> {
        let s = self.state();
        let c = s
            .containers
            .get(&p.container_id)
            .ok_or_else(|| not_found(&p.container_id))?;
        if p.exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let missing = || {
            Status::not_found(format!(
                "exec {} not found in container {}",
                p.exec_id, p.container_id
            ))
        };
        c.execs.get(&p.exec_id).cloned().ok_or_else(missing)
    }

    /// The real agent's removal: SIGTERM (when started and given a grace),
    /// SIGKILL after the grace, then forget it. Unknown IDs pass.
    async fn remove(&self, id: &str, grace: Duration) -> Result<(), Status> {
        let (init, execs, ignores) = {
            let s = self.state();
            let Some(c) = s.containers.get(id) else {
                return Ok(());
            };
            let execs: Vec<Proc> = c.execs.values().cloned().collect();
            (c.init.clone(), execs, s.ignore_sigterm.contains(id))
        };
        if !grace.is_zero() && init.life.borrow().started_at_ns != 0 {
            init.signal(SIGTERM, ignores);
            let _ = unless_stopped(&self.stopped, tokio::time::timeout(grace, init.wait())).await?;
        }
        for p in execs.iter().chain([&init]) {
            p.signal(SIGKILL, false);
        }
        self.state().containers.remove(id);
        Ok(())
    }
}

#[tonic::async_trait]
impl Agent for Shared {
    async fn health(&self, req: Request<pb::HealthRequest>) -> Reply<pb::HealthResponse> {
        self.enter("Health", req)?;
        ok(pb::HealthResponse {
            status: pb::health_response::Status::Serving as i32,
        })
    }

    async fn get_guest_info(&self, req: Request<pb::GuestInfoRequest>) -> Reply<pb::GuestInfo> {
        self.enter("GetGuestInfo", req)?;
        ok(pb::GuestInfo {
            api_version: vmcri_proto::AGENT_API_VERSION,
            agent_version: "0.0.0-fake".into(),
            kernel_release: "6.12.0-fake".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            uptime_ms: u64::try_from(self.booted.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    type StreamProbeStream = BoxStream<pb::ProbeChunk>;

    async fn stream_probe(&self, req: Request<pb::ProbeRequest>) -> Reply<Self::StreamProbeStream> {
        let req = self.enter("StreamProbe", req)?;
        // The real agent's limits and default chunk.
        let chunk = u64::from(if req.chunk_size == 0 {
            64 << 10
        } else {
            req.chunk_size
        });
        if req.bytes > 1 << 30 || chunk > 1 << 20 {
            return Err(Status::invalid_argument(
                "probe or chunk size over the limit",
            ));
        }
        let size = move |i: u64| usize::try_from((req.bytes - i * chunk).min(chunk)).unwrap_or(0);
        let chunks = (0..req.bytes.div_ceil(chunk)).map(move |i| {
            Ok(pb::ProbeChunk {
                data: vec![0x5a; size(i)],
            })
        });
        ok(Box::pin(tokio_stream::iter(chunks)))
    }

    async fn setup_sandbox(
        &self,
        req: Request<pb::SetupSandboxRequest>,
    ) -> Reply<pb::SetupSandboxResponse> {
        self.enter("SetupSandbox", req)?;
        ok(pb::SetupSandboxResponse {})
    }

    async fn update_interfaces(
        &self,
        req: Request<pb::UpdateInterfacesRequest>,
    ) -> Reply<pb::UpdateInterfacesResponse> {
        self.enter("UpdateInterfaces", req)?;
        ok(pb::UpdateInterfacesResponse {})
    }

    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Reply<pb::CreateContainerResponse> {
        let req = self.enter("CreateContainer", req)?;
        let id = req.container_id;
        if !req.mounts.is_empty() {
            return Err(Status::invalid_argument(
                "CreateContainer: the mounts field is reserved",
            ));
        }
        check_id("container", &id)?;
        let mut s = self.state();
        if s.containers.contains_key(&id) {
            return Err(Status::already_exists(format!(
                "container {id} already exists"
            )));
        }
        let spec: Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| Status::invalid_argument(format!("invalid OCI spec: {e}")))?;
        let process = spec.process().as_ref();
        let args = process
            .and_then(|p| p.args().as_deref())
            .unwrap_or_default();
        if args.is_empty() {
            return Err(Status::invalid_argument("the OCI spec has no process args"));
        }
        // An init that is `cat` echoes its stdin, so tests can see it.
        let echo_stdin = default_script(args).echo_stdin.then_some(0);
        let tty = process.and_then(|p| p.terminal()).unwrap_or(false);
        s.last_pid += 1;
        let init = Proc::new(s.last_pid, tty, req.stdin, echo_stdin);
        let pid = init.pid;
        s.containers.insert(
            id,
            Container {
                init,
                execs: HashMap::new(),
                resources: None,
            },
        );
        ok(pb::CreateContainerResponse { pid })
    }

    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Reply<pb::StartContainerResponse> {
        let id = self.enter("StartContainer", req)?.container_id;
        let mut refused = None;
        self.init(&id)?.life.send_if_modified(|l| {
            match (l.exit.is_some(), l.started_at_ns) {
                (true, _) => refused = Some("has exited"),
                (false, 0) => l.started_at_ns = now_ns(),
                (false, _) => refused = Some("is already started"),
            }
            refused.is_none()
        });
        match refused {
            Some(why) => Err(Status::failed_precondition(format!("container {id} {why}"))),
            None => ok(pb::StartContainerResponse {}),
        }
    }

    async fn remove_container(
        &self,
        req: Request<pb::RemoveContainerRequest>,
    ) -> Reply<pb::RemoveContainerResponse> {
        let req = self.enter("RemoveContainer", req)?;
        let grace = Duration::from_secs(u64::from(req.timeout_secs));
        self.remove(&req.container_id, grace).await?;
        ok(pb::RemoveContainerResponse {})
    }

    async fn update_container_resources(
        &self,
        req: Request<pb::UpdateResourcesRequest>,
    ) -> Reply<pb::UpdateResourcesResponse> {
        let req = self.enter("UpdateContainerResources", req)?;
        let (mut s, id) = (self.state(), req.container_id);
        let c = s.containers.get_mut(&id).ok_or_else(|| not_found(&id))?;
        if c.init.exited() {
            return Err(Status::failed_precondition(format!(
                "container {id} has exited"
            )));
        }
        c.resources = Some(req.resources.unwrap_or_default());
        ok(pb::UpdateResourcesResponse {})
    }

    async fn exec_process(
        &self,
        req: Request<pb::ExecProcessRequest>,
    ) -> Reply<pb::ExecProcessResponse> {
        let req = self.enter("ExecProcess", req)?;
        // The real agent's checks, in its order.
        let key_value = |kv: &&String| kv.split_once('=').is_some_and(|(k, _)| !k.is_empty());
        if let Some(kv) = req.env.iter().find(|kv| !key_value(kv)) {
            return Err(Status::invalid_argument(format!(
                "ExecProcess: env entry {kv:?} is not KEY=VALUE"
            )));
        }
        check_id("exec", &req.exec_id)?;
        if req.args.is_empty() {
            return Err(Status::invalid_argument("exec: no command given"));
        }
        if !req.cwd.is_empty() && !req.cwd.starts_with('/') {
            return Err(Status::invalid_argument("exec: cwd must be absolute"));
        }
        // Taken out of its lock first: the test's script runs unlocked.
        let script = lock(&self.script).clone();
        let script = script(&req.args);
        let proc = {
            let (mut s, id) = (self.state(), &req.container_id);
            s.last_pid += 1;
            let pid = s.last_pid;
            let c = s.containers.get_mut(id).ok_or_else(|| not_found(id))?;
            if !c.running() {
                return Err(Status::failed_precondition(format!(
                    "container {id} is not running"
                )));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(Status::already_exists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            let p = Proc::new(
                pid,
                req.tty,
                req.stdin,
                script.echo_stdin.then_some(script.exit_code),
            );
            c.execs.insert(req.exec_id.clone(), p.clone());
            p
        };
        proc.emit(Out::Stdout, &script.stdout);
        proc.emit(Out::Stderr, &script.stderr);
        if script.echo_stdin {
            // `cat` on /dev/null ends at once; on a stdin, at its end.
            if !req.stdin {
                proc.end(script.exit_code, 0);
            }
        } else if script.runs_for.is_zero() {
            proc.end(script.exit_code, 0);
        } else {
            let (p, stopped) = (proc.clone(), self.stopped.clone());
            tokio::spawn(async move {
                let run = async {
                    tokio::select! {
                        _ = tokio::time::sleep(script.runs_for) => p.end(script.exit_code, 0),
                        _ = p.wait() => {} // A signal ended it first.
                    }
                };
                let _ = unless_stopped(&stopped, run).await;
            });
        }
        ok(pb::ExecProcessResponse { pid: proc.pid })
    }

    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Reply<pb::SignalProcessResponse> {
        let req = self.enter("SignalProcess", req)?;
        let p = process_ref(req.process)?;
        if !(1..=64).contains(&req.signal) {
            return Err(Status::invalid_argument(format!(
                "invalid signal {}",
                req.signal
            )));
        }
        // It is the container's program that ignores SIGTERM, not its execs.
        let ignores = p.exec_id.is_empty() && self.state().ignore_sigterm.contains(&p.container_id);
        self.lookup(&p)?.signal(req.signal, ignores);
        ok(pb::SignalProcessResponse {})
    }

    async fn wait_process(
        &self,
        req: Request<pb::WaitProcessRequest>,
    ) -> Reply<pb::WaitProcessResponse> {
        let p = process_ref(self.enter("WaitProcess", req)?.process)?;
        let ended = unless_stopped(&self.stopped, self.lookup(&p)?.wait()).await?;
        // The real agent forgets an exec once it has been waited for.
        if let Some(c) = self.state().containers.get_mut(&p.container_id) {
            c.execs.remove(&p.exec_id);
        }
        ok(ended)
    }

    async fn write_stdin(
        &self,
        req: Request<Streaming<pb::StdinChunk>>,
    ) -> Reply<pb::WriteStdinResponse> {
        let mut chunks = self.enter("WriteStdin", req)?;
        let mut chunk = unless_stopped(&self.stopped, chunks.next())
            .await?
            .transpose()?;
        // Only the first message names the process.
        let proc = match &chunk {
            Some(first) => self.lookup(&process_ref(first.process.clone())?)?,
            None => return ok(pb::WriteStdinResponse { bytes_written: 0 }),
        };
        let mut bytes_written = 0;
        while let Some(c) = chunk {
            proc.write_stdin(&c.data, c.eof)?;
            bytes_written += c.data.len() as u64;
            if c.eof {
                break;
            }
            chunk = unless_stopped(&self.stopped, chunks.next())
                .await?
                .transpose()?;
        }
        ok(pb::WriteStdinResponse { bytes_written })
    }

    type ReadOutputStream = BoxStream<pb::OutputChunk>;

    async fn read_output(
        &self,
        req: Request<pb::ReadOutputRequest>,
    ) -> Reply<Self::ReadOutputStream> {
        let req = self.enter("ReadOutput", req)?;
        let mut life = self.lookup(&process_ref(req.process)?)?.life.subscribe();
        let (mut pos, stopped) = (req.from_offset, self.stopped.clone());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                // What is new since `pos`, cut to start there; and whether
                // that is all (nothing is written after the end).
                let (new, ended): (Vec<pb::OutputChunk>, bool) = {
                    let l = life.borrow_and_update();
                    let new = l
                        .output
                        .iter()
                        .filter(|c| c.offset + c.data.len() as u64 > pos);
                    let cut = |c: &pb::OutputChunk| {
                        let skip = pos.saturating_sub(c.offset);
                        let at = usize::try_from(skip)
                            .unwrap_or(usize::MAX)
                            .min(c.data.len());
                        let data = c.data[at..].to_vec();
                        pb::OutputChunk {
                            data,
                            offset: c.offset + skip,
                            ..*c
                        }
                    };
                    (new.map(cut).collect(), l.exit.is_some())
                };
                for c in new {
                    pos = c.offset + c.data.len() as u64;
                    if tx.send(Ok(c)).await.is_err() {
                        return; // The reader left.
                    }
                }
                if ended {
                    return;
                }
                match unless_stopped(&stopped, life.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn resize_tty(&self, req: Request<pb::ResizeTtyRequest>) -> Reply<pb::ResizeTtyResponse> {
        let req = self.enter("ResizeTty", req)?;
        let p = process_ref(req.process)?;
        if let Some(v) = [req.rows, req.cols]
            .into_iter()
            .find(|v| *v > u32::from(u16::MAX))
        {
            return Err(Status::invalid_argument(format!(
                "ResizeTty: {v} exceeds 65535"
            )));
        }
        if !self.lookup(&p)?.tty {
            return Err(Status::failed_precondition(
                "the process was not started with a TTY",
            ));
        }
        ok(pb::ResizeTtyResponse {})
    }

    async fn container_stats(
        &self,
        req: Request<pb::ContainerStatsRequest>,
    ) -> Reply<pb::ContainerStatsResponse> {
        let mut ids = self.enter("ContainerStats", req)?.container_ids;
        let s = self.state();
        if ids.is_empty() {
            ids = s.containers.keys().cloned().collect();
        }
        // As in the real agent, an unknown ID fails the whole call.
        let stats = ids.into_iter().map(|id| match s.containers.get(&id) {
            Some(c) => Ok((id, c.stats())),
            None => Err(not_found(&id)),
        });
        ok(pb::ContainerStatsResponse {
            stats: stats.collect::<Result<_, _>>()?,
        })
    }

    async fn sandbox_stats(
        &self,
        req: Request<pb::SandboxStatsRequest>,
    ) -> Reply<pb::SandboxStatsResponse> {
        self.enter("SandboxStats", req)?;
        // The sum of the containers', as their parent cgroup counts.
        let mut t = pb::CgroupStats {
            timestamp_ns: now_ns(),
            ..Default::default()
        };
        for c in self.state().containers.values().map(Container::stats) {
            t.cpu_usage_ns += c.cpu_usage_ns;
            t.memory_usage_bytes += c.memory_usage_bytes;
            t.memory_working_set_bytes += c.memory_working_set_bytes;
            t.memory_rss_bytes += c.memory_rss_bytes;
            t.memory_page_faults += c.memory_page_faults;
            t.memory_major_page_faults += c.memory_major_page_faults;
            t.pids_current += c.pids_current;
        }
        ok(pb::SandboxStatsResponse { stats: Some(t) })
    }

    type PortForwardStream = BoxStream<pb::ForwardChunk>;

    async fn port_forward(
        &self,
        req: Request<Streaming<pb::ForwardChunk>>,
    ) -> Reply<Self::PortForwardStream> {
        let mut inbound = self.enter("PortForward", req)?;
        let first = unless_stopped(&self.stopped, inbound.next())
            .await?
            .transpose()?;
        let first = first.ok_or_else(|| Status::invalid_argument("PortForward: no port"))?;
        if !(1..=65535).contains(&first.port) {
            return Err(Status::invalid_argument(format!(
                "PortForward: port {} is not 1-65535",
                first.port
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let stopped = self.stopped.clone();
        // Every port has an echo server; the host's EOF gets ours back.
        tokio::spawn(async move {
            let mut chunk = Some(first);
            while let Some(c) = chunk {
                let (data, eof) = (c.data, c.eof);
                let echo = pb::ForwardChunk {
                    data,
                    ..Default::default()
                };
                if !echo.data.is_empty() && tx.send(Ok(echo)).await.is_err() {
                    return;
                }
                if eof {
                    let _ = tx
                        .send(Ok(pb::ForwardChunk {
                            eof,
                            ..Default::default()
                        }))
                        .await;
                    return;
                }
                // The host went away, or the fake stopped: drop the connection.
                let next = unless_stopped(&stopped, inbound.next()).await;
                chunk = next.ok().flatten().and_then(Result::ok);
            }
        });
        ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn shutdown(&self, req: Request<pb::ShutdownRequest>) -> Reply<pb::ShutdownResponse> {
        self.enter("Shutdown", req)?;
        // As the real agent: containers first, then the "VM", once the
        // reply has had time to leave.
        let ids: Vec<String> = self.state().containers.keys().cloned().collect();
        for id in ids {
            self.remove(&id, Duration::ZERO).await?;
        }
        let stopped = self.stopped.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stopped.send_replace(true);
        });
        ok(pb::ShutdownResponse {})
    }
}

/// An in-memory agent serving the agent API on a Unix socket. Dropping it
/// stops the server; calls in flight then fail with `Unavailable`.
pub struct FakeAgent {
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl FakeAgent {
    /// Serves on `socket_path` on the current tokio runtime. Panics if the
    /// socket cannot be bound: that is the test's setup failing.
    pub fn serve(socket_path: impl AsRef<Path>) -> FakeAgent {
        let path = socket_path.as_ref();
        let listener = tokio::net::UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("FakeAgent: binding {}: {e}", path.display()));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            script: Mutex::new(Arc::new(default_script)),
            stopped: watch::Sender::new(false),
            booted: Instant::now(),
        });
        let mut stopped = shared.stopped.subscribe();
        let router =
            tonic::transport::Server::builder().add_service(AgentServer::from_arc(shared.clone()));
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let served =
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop);
            if let Err(e) = served.await {
                eprintln!("FakeAgent: the server failed: {e}");
            }
        });
        FakeAgent {
            shared,
            server: Some(server),
        }
    }

    /// Stops the server and waits until it has ended.
    pub async fn shutdown(mut self) {
        self.shared.stopped.send_replace(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// The RPCs received so far, in order, named as in agent.proto
    /// (`"CreateContainer"`); failed ones too.
    pub fn calls(&self) -> Vec<String> {
        self.shared.state().calls.clone()
    }

    /// Fails the next call of `rpc` (named as in [`FakeAgent::calls`]) with
    /// `code` before it does anything; repeated, it fails as many calls.
    pub fn fail_next(&self, rpc: &str, code: Code) {
        let mut s = self.shared.state();
        s.failures
            .entry(rpc.to_string())
            .or_default()
            .push_back(code);
    }

    /// Makes container `id`'s init exit with `code` (if it has not ended).
    pub fn exit(&self, container_id: &str, code: i32) {
        self.init(container_id).end(code, 0);
    }

    /// Has container `id`'s init write `data` (dropped once it has ended).
    pub fn emit(&self, container_id: &str, stream: Out, data: &[u8]) {
        self.init(container_id).emit(stream, data);
    }

    /// Makes container `id`'s program ignore SIGTERM, so only SIGKILL
    /// stops it; it may be set before the container exists.
    pub fn ignore_sigterm(&self, container_id: &str) {
        self.shared
            .state()
            .ignore_sigterm
            .insert(container_id.to_string());
    }

    /// Replaces the exec script, which maps an exec's args to what it does.
    pub fn set_exec_script(&self, script: impl Fn(&[String]) -> Script + Send + Sync + 'static) {
        *lock(&self.shared.script) = Arc::new(script);
    }

    /// The resources last set on container `id` by UpdateContainerResources.
    pub fn resources(&self, container_id: &str) -> Option<pb::Resources> {
        self.shared
            .state()
            .containers
            .get(container_id)?
            .resources
            .clone()
    }

    fn init(&self, id: &str) -> Proc {
        self.shared
            .init(id)
            .unwrap_or_else(|_| panic!("FakeAgent: no container {id}"))
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.shared.stopped.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use vmcri_agent_client::{Agent as Client, AgentAddr, ClientError};

    const SECOND: Duration = Duration::from_secs(1);

    async fn start() -> (tempfile::TempDir, FakeAgent, Client) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let fake = FakeAgent::serve(&path);
        let agent = Client::connect(AgentAddr::Unix(path), SECOND, SECOND)
            .await
            .unwrap();
        (dir, fake, agent)
    }

    /// Fails the test instead of hanging it.
    async fn soon<T>(fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(SECOND, fut).await.expect("timed out")
    }

    /// Whether `fut` is still pending after 100 ms.
    async fn pending<T>(fut: impl Future<Output = T>) -> bool {
        tokio::time::timeout(Duration::from_millis(100), fut)
            .await
            .is_err()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
        match r {
            Err(ClientError::Rpc { status, .. }) => status.code(),
            other => panic!("expected an RPC error, got {other:?}"),
        }
    }

    fn proc(id: &str, exec_id: &str) -> pb::ProcessRef {
        pb::ProcessRef {
            container_id: id.into(),
            exec_id: exec_id.into(),
        }
    }

    async fn create(agent: &Client, id: &str, args: &[&str]) -> Result<u32, ClientError> {
        let mut spec = Spec::default();
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
        spec.set_process(Some(process));
        let oci_spec_json = serde_json::to_vec(&spec).unwrap();
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json,
            ..Default::default()
        };
        agent.create_container(req).await
    }

    async fn running(agent: &Client, id: &str) {
        create(agent, id, &["app"]).await.unwrap();
        agent.start_container(id).await.unwrap();
    }

    /// Runs `args` as exec `exec_id` in container c1.
    async fn exec(
        agent: &Client,
        exec_id: &str,
        args: &[&str],
        stdin: bool,
    ) -> Result<u32, ClientError> {
        let (container_id, exec_id) = ("c1".into(), exec_id.into());
        let args = args.iter().map(|a| a.to_string()).collect();
        let req = pb::ExecProcessRequest {
            container_id,
            exec_id,
            args,
            stdin,
            ..Default::default()
        };
        agent.exec_process(req).await
    }

    /// All of a process's output from `from` on, as (offset, stream, data).
    async fn output(agent: &Client, p: pb::ProcessRef, from: u64) -> Vec<(u64, Out, Vec<u8>)> {
        let mut out = agent.read_output(p, from).await.unwrap();
        let mut got = Vec::new();
        while let Some(c) = soon(out.next()).await.map(Result::unwrap) {
            got.push((c.offset, c.stream(), c.data));
        }
        got
    }

    /// Waits for container `id` in the background, from when the fake has
    /// the call (so that what the test does next happens during it).
    async fn waiter(
        fake: &FakeAgent,
        agent: &Client,
        id: &str,
    ) -> JoinHandle<Result<pb::WaitProcessResponse, ClientError>> {
        let waits = || fake.calls().iter().filter(|c| *c == "WaitProcess").count();
        let (before, agent, p) = (waits(), agent.clone(), proc(id, ""));
        let task = tokio::spawn(async move { agent.wait(p).await });
        soon(async {
            while waits() == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        task
    }

    #[tokio::test]
    async fn a_container_is_created_started_and_waited_for() {
        let (_dir, fake, agent) = start().await;
        assert!(create(&agent, "c1", &["app"]).await.unwrap() > 0);
        assert_eq!(
            code(create(&agent, "c1", &["app"]).await),
            Code::AlreadyExists
        );
        assert_eq!(
            code(create(&agent, "../x", &["app"]).await),
            Code::InvalidArgument
        );
        let bad = pb::CreateContainerRequest {
            container_id: "c2".into(),
            oci_spec_json: b"{".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            code(agent.create_container(bad).await),
            Code::InvalidArgument
        );
        assert_eq!(code(agent.start_container("nope").await), Code::NotFound);
        agent.start_container("c1").await.unwrap();
        assert_eq!(
            code(agent.start_container("c1").await),
            Code::FailedPrecondition
        );
        let waiting = waiter(&fake, &agent, "c1").await;
        fake.exit("c1", 3);
        let ended = soon(waiting).await.unwrap().unwrap();
        assert_eq!(
            (ended.exit_code, ended.signal, ended.reason()),
            (3, 0, Reason::Exited)
        );
        assert!(ended.started_at_ns > 0 && ended.finished_at_ns >= ended.started_at_ns);
        assert_eq!(
            code(agent.start_container("c1").await),
            Code::FailedPrecondition
        );
        agent.remove_container("c1", SECOND).await.unwrap();
        agent.remove_container("c1", SECOND).await.unwrap();
        assert_eq!(code(agent.wait(proc("c1", "")).await), Code::NotFound);
    }

    #[tokio::test]
    async fn output_is_read_from_an_offset_until_the_process_ends() {
        let (_dir, fake, agent) = start().await;
        running(&agent, "c1").await;
        fake.emit("c1", Out::Stdout, b"hello ");
        fake.emit("c1", Out::Stderr, b"world");
        let mut out = agent.read_output(proc("c1", ""), 3).await.unwrap();
        let mut next = async || {
            let c = soon(out.next()).await.unwrap().unwrap();
            (c.offset, c.stream(), c.data)
        };
        assert_eq!(next().await, (3, Out::Stdout, b"lo ".to_vec()));
        assert_eq!(next().await, (6, Out::Stderr, b"world".to_vec()));
        // Output written while it reads arrives on the same stream.
        fake.emit("c1", Out::Stdout, b"!");
        assert_eq!(next().await, (11, Out::Stdout, b"!".to_vec()));
        fake.exit("c1", 0);
        assert!(soon(out.next()).await.is_none());
        // A new reader resumes wherever it asks, even after the end.
        let rest = output(&agent, proc("c1", ""), 8).await;
        assert_eq!(
            rest,
            [
                (8, Out::Stderr, b"rld".to_vec()),
                (11, Out::Stdout, b"!".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn execs_run_their_script() {
        let (_dir, fake, agent) = start().await;
        create(&agent, "c1", &["app"]).await.unwrap();
        assert_eq!(
            code(exec(&agent, "e0", &["true"], false).await),
            Code::FailedPrecondition
        );
        agent.start_container("c1").await.unwrap();
        assert_eq!(
            code(exec(&agent, "e0", &[], false).await),
            Code::InvalidArgument
        );
        exec(&agent, "e1", &["echo", "hi", "there"], false)
            .await
            .unwrap();
        assert_eq!(
            output(&agent, proc("c1", "e1"), 0).await,
            [(0, Out::Stdout, b"hi there\n".to_vec())]
        );
        assert_eq!(
            soon(agent.wait(proc("c1", "e1"))).await.unwrap().exit_code,
            0
        );
        // Forgotten once waited for, as in the real agent.
        assert_eq!(code(agent.wait(proc("c1", "e1")).await), Code::NotFound);
        exec(&agent, "e2", &["false"], false).await.unwrap();
        assert_eq!(
            soon(agent.wait(proc("c1", "e2"))).await.unwrap().exit_code,
            1
        );
        exec(&agent, "e3", &["sleep", "5"], false).await.unwrap();
        assert_eq!(
            code(exec(&agent, "e3", &["true"], false).await),
            Code::AlreadyExists
        );
        assert!(
            pending(agent.wait(proc("c1", "e3"))).await,
            "sleep 5 ended early"
        );
        agent.signal(proc("c1", "e3"), SIGKILL).await.unwrap();
        let ended = soon(agent.wait(proc("c1", "e3"))).await.unwrap();
        assert_eq!((ended.exit_code, ended.reason()), (137, Reason::Signaled));
        fake.set_exec_script(|args| Script {
            stderr: b"no\n".to_vec(),
            exit_code: i32::try_from(args.len()).unwrap_or(i32::MAX),
            ..Script::default()
        });
        exec(&agent, "e4", &["a", "b", "c"], false).await.unwrap();
        assert_eq!(
            output(&agent, proc("c1", "e4"), 0).await,
            [(0, Out::Stderr, b"no\n".to_vec())]
        );
        assert_eq!(
            soon(agent.wait(proc("c1", "e4"))).await.unwrap().exit_code,
            3
        );
    }

    #[tokio::test]
    async fn sigterm_ends_a_container_unless_its_program_ignores_it() {
        let (_dir, fake, agent) = start().await;
        fake.ignore_sigterm("c2");
        running(&agent, "c1").await;
        running(&agent, "c2").await;
        assert_eq!(
            code(agent.signal(proc("c1", ""), 0).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(agent.signal(proc("nope", ""), SIGTERM).await),
            Code::NotFound
        );
        agent.signal(proc("c1", ""), SIGTERM).await.unwrap();
        let ended = soon(agent.wait(proc("c1", ""))).await.unwrap();
        assert_eq!(
            (ended.exit_code, ended.signal, ended.reason()),
            (143, SIGTERM, Reason::Signaled)
        );
        // Signalling what has ended is no error.
        agent.signal(proc("c1", ""), SIGKILL).await.unwrap();
        agent.signal(proc("c2", ""), SIGTERM).await.unwrap();
        assert!(
            pending(agent.wait(proc("c2", ""))).await,
            "c2 ignores SIGTERM"
        );
        agent.signal(proc("c2", ""), SIGKILL).await.unwrap();
        assert_eq!(
            soon(agent.wait(proc("c2", ""))).await.unwrap().exit_code,
            137
        );
        // Removal with a grace: SIGTERM ends c3 at once, well within it.
        running(&agent, "c3").await;
        let waiting = waiter(&fake, &agent, "c3").await;
        soon(agent.remove_container("c3", Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(soon(waiting).await.unwrap().unwrap().signal, SIGTERM);
    }

    #[tokio::test]
    async fn fail_next_fails_only_the_next_call_of_that_rpc() {
        let (_dir, fake, agent) = start().await;
        fake.fail_next("Health", Code::Unavailable);
        fake.fail_next("StartContainer", Code::Internal);
        assert_eq!(code(agent.health().await), Code::Unavailable);
        agent.health().await.unwrap();
        create(&agent, "c1", &["app"]).await.unwrap();
        assert_eq!(code(agent.start_container("c1").await), Code::Internal);
        agent.start_container("c1").await.unwrap();
        let calls = [
            "Health",
            "Health",
            "Health",
            "CreateContainer",
            "StartContainer",
            "StartContainer",
        ];
        assert_eq!(fake.calls(), calls);
    }

    #[tokio::test]
    async fn stdin_forwarding_resources_and_stats() {
        let (_dir, fake, agent) = start().await;
        assert_eq!(agent.guest_info().await.unwrap().cpus, 2);
        assert_eq!(agent.probe(100_000, 0, SECOND).await.unwrap(), 100_000);
        running(&agent, "c1").await;
        // `cat` echoes its stdin and ends with it.
        exec(&agent, "cat", &["cat"], true).await.unwrap();
        let (tx, rx) = mpsc::channel(2);
        tx.send(Bytes::from_static(b"ping")).await.unwrap();
        drop(tx);
        assert_eq!(
            soon(agent.write_stdin(proc("c1", "cat"), rx, true))
                .await
                .unwrap(),
            4
        );
        assert_eq!(
            output(&agent, proc("c1", "cat"), 0).await,
            [(0, Out::Stdout, b"ping".to_vec())]
        );
        assert_eq!(
            soon(agent.wait(proc("c1", "cat"))).await.unwrap().exit_code,
            0
        );
        let (_, rx) = mpsc::channel(1);
        let no_stdin = soon(agent.write_stdin(proc("c1", ""), rx, true)).await;
        assert_eq!(code(no_stdin), Code::FailedPrecondition);
        assert_eq!(
            code(agent.resize(proc("c1", ""), 24, 80).await),
            Code::FailedPrecondition
        );
        // An echo server on every port.
        let (tx, rx) = mpsc::channel(2);
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(tx);
        let mut back = agent.port_forward(8080, rx).await.unwrap();
        assert_eq!(soon(back.message()).await.unwrap().unwrap().data, b"abc");
        assert!(soon(back.message()).await.unwrap().unwrap().eof);
        assert!(soon(back.message()).await.unwrap().is_none());
        let limits = pb::Resources {
            memory_limit_bytes: 1 << 30,
            ..Default::default()
        };
        agent.update_resources("c1", limits.clone()).await.unwrap();
        assert_eq!(fake.resources("c1"), Some(limits));
        let stats = agent.container_stats(vec!["c1".into()]).await.unwrap();
        assert_eq!(stats.keys().collect::<Vec<_>>(), ["c1"]);
        assert_eq!(stats["c1"].pids_current, 1);
        assert_eq!(
            code(agent.container_stats(vec!["nope".into()]).await),
            Code::NotFound
        );
        assert_eq!(
            agent.sandbox_stats().await.unwrap().memory_usage_bytes,
            8 << 20
        );
    }

    #[tokio::test]
    async fn shutdown_ends_the_containers_then_the_server() {
        let (dir, fake, agent) = start().await;
        running(&agent, "c1").await;
        let waiting = waiter(&fake, &agent, "c1").await;
        agent.shutdown().await.unwrap();
        assert_eq!(soon(waiting).await.unwrap().unwrap().signal, SIGKILL);
        soon(fake.shutdown()).await;
        let addr = AgentAddr::Unix(dir.path().join("agent.sock"));
        let again =
            Client::connect(addr, Duration::from_millis(150), Duration::from_millis(100)).await;
        assert!(matches!(again, Err(ClientError::NotReady { .. })));
    }

    #[tokio::test]
    async fn dropping_the_fake_ends_calls_in_flight() {
        let (_dir, fake, agent) = start().await;
        running(&agent, "c1").await;
        let waiting = waiter(&fake, &agent, "c1").await;
        drop(fake);
        assert_eq!(code(soon(waiting).await.unwrap()), Code::Unavailable);
    }
}
