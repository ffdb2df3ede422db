//! The SDK for one Rust service: connect, register, answer tools, look up
//! and subscribe to discovery, deregister on the way out. Runs one worker
//! thread; calls from any thread go through its control mailbox.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use super::session::SessionEvent;
use super::worker::{Control, Observer, SwarmStats, Worker, WorkerConfig};
use super::{Backoff, Controllers, ServiceSpec, Tools};
use crate::engine::io::StartGroup;
use crate::engine::mailbox::Mailbox;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the controller answered with an error: {0}")]
    Rpc(Value),
    #[error("the agent has stopped")]
    Stopped,
}

type ChangeCallback = Box<dyn Fn(&Value) + Send>;

#[derive(Default)]
struct State {
    registered: Mutex<Option<Uuid>>,
    changed: Condvar,
    /// Filters subscribed to, renewed after every re-registration.
    subscriptions: Mutex<Vec<Value>>,
    on_change: Mutex<Vec<ChangeCallback>>,
}

struct SdkObserver(Arc<State>);

impl Observer for SdkObserver {
    fn event(&mut self, _slot: usize, event: &SessionEvent) {
        let state = &self.0;
        match event {
            SessionEvent::Registered(id) => {
                *state.registered.lock().unwrap_or_else(|e| e.into_inner()) = Some(*id);
                state.changed.notify_all();
            }
            SessionEvent::Closed { .. } | SessionEvent::Refused { .. } => {
                *state.registered.lock().unwrap_or_else(|e| e.into_inner()) = None;
                state.changed.notify_all();
            }
            SessionEvent::Notification { method, params } if method == "discovery/changed" => {
                for callback in state
                    .on_change
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                {
                    callback(params);
                }
            }
            _ => {}
        }
    }

    fn after_register(&mut self) -> Vec<(&'static str, Value)> {
        let subs = self
            .0
            .subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        subs.iter()
            .map(|filter| ("discovery/subscribe", filter.clone()))
            .collect()
    }
}

/// One service's connection to the controller, kept up in the background.
pub struct Agent {
    state: Arc<State>,
    control: Arc<Mailbox<Control>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<SwarmStats>,
}

impl Agent {
    /// Starts the service's connection to one of `controllers`: the first
    /// tried is picked at random (so services given the same list spread
    /// over the nodes), and each failure, close or drain moves it to the
    /// next in the list.
    pub fn start(
        controllers: Controllers,
        spec: ServiceSpec,
        tools: Arc<dyn Tools>,
        backoff: Backoff,
    ) -> std::io::Result<Agent> {
        let state = Arc::new(State::default());
        let control = Arc::new(Mailbox::new(1024)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(SwarmStats::default());
        let first_controller = Some(fastrand::usize(..controllers.len()));
        let config = WorkerConfig {
            controllers,
            first_controller,
            authorization: None,
            sources: Vec::new(),
            backoff,
            connect_rate: 100.0,
            register_timeout: Duration::from_secs(15),
            client_ping: Some(Duration::from_secs(30)),
            stop: stop.clone(),
            deadline: None,
            own_fd_table: false,
            probe: None,
        };
        let (st, ctl, sts) = (state.clone(), control.clone(), stats.clone());
        let mut group = StartGroup::default();
        group.spawn("tether-agent".into(), move |ready| {
            let specs = vec![Arc::new(spec)];
            let setup = Worker::new(config, specs, 0, tools, SdkObserver(st), sts, Some(ctl));
            ready.then_run(setup, Worker::run);
        });
        let (mut threads, ready) = group.wait();
        let agent = Agent {
            state,
            control,
            stop,
            thread: threads.pop(),
            stats,
        };
        ready.map_err(|(_, why)| std::io::Error::other(format!("agent thread: {why}")))?;
        Ok(agent)
    }

    pub fn stats(&self) -> &Arc<SwarmStats> {
        &self.stats
    }

    pub fn runtime_instance_id(&self) -> Option<Uuid> {
        *self
            .state
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until registered (again); returns the runtimeInstanceId.
    pub fn wait_registered(&self, timeout: Duration) -> Option<Uuid> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .state
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if guard.is_some() {
                return *guard;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = self
                .state
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn request(
        &self,
        method: &'static str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let (tx, rx) = sync_channel(1);
        self.control
            .post(Control::Request {
                method,
                params,
                reply: tx,
            })
            .map_err(|_| AgentError::Stopped)?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(error)) => Err(AgentError::Rpc(error)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(AgentError::Timeout(timeout)),
            Err(_) => Err(AgentError::Stopped),
        }
    }

    fn filter(service_id: &str, env_tag: Option<&str>, protocol: Option<&str>) -> Value {
        let mut filter = json!({"serviceId": service_id});
        if let Some(env) = env_tag {
            filter["envTag"] = env.into();
        }
        if let Some(p) = protocol {
            filter["protocol"] = p.into();
        }
        filter
    }

    /// `discovery/lookup`: the snapshot of matching instances.
    pub fn lookup(
        &self,
        service_id: &str,
        env_tag: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        self.request(
            "discovery/lookup",
            Self::filter(service_id, env_tag, None),
            timeout,
        )
    }

    /// `discovery/subscribe`: the snapshot now; later snapshots go to the
    /// `on_change` callbacks. Renewed after every reconnect.
    pub fn subscribe(
        &self,
        service_id: &str,
        env_tag: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let filter = Self::filter(service_id, env_tag, None);
        let snapshot = self.request("discovery/subscribe", filter.clone(), timeout)?;
        self.state
            .subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(filter);
        Ok(snapshot)
    }

    /// Calls `callback` with every `discovery/changed` snapshot.
    pub fn on_change(&self, callback: impl Fn(&Value) + Send + 'static) {
        self.state
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(callback));
    }

    /// Deregisters; true when the controller confirmed it.
    pub fn deregister(&self, reason: &str, timeout: Duration) -> bool {
        let (tx, rx) = sync_channel(1);
        let posted = self.control.post(Control::Deregister {
            reason: reason.into(),
            reply: tx,
        });
        posted.is_ok() && rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// Stops the connection (without deregistering: see `deregister`).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.control.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.halt();
    }
}
