//! The backend thread: what clients ask the backend (`op: rpc`) and the
//! proxies (connect, subscribe, publish) go out as webhook calls, and the
//! answers come back to the connection's shard.
//!
//! An `rpc` call whose method a backend handles on its admin connection
//! (HANDLE, `rpc.admin_handlers`) goes to the admin gateway instead, which
//! sends it to that connection and routes the ANSWER back (admin/handlers.rs).
//!
//! One thread owns a bus endpoint, routes each call to its URL, keeps a
//! circuit breaker per URL and a bounded queue in front of a fixed pool of
//! worker threads (`rpc.concurrency_max`) that make the blocking HTTP
//! calls, each bounded by `rpc.timeout_ms`. A dead or slow backend costs at
//! most `queue_max` waiting calls; beyond that, and while a breaker is
//! open, calls fail at once with `unavailable`. Shards never wait: a
//! connection's own command order is kept by the shard (input pauses for a
//! proxy call), and `rpc` answers are matched by the client's id.

pub(crate) mod webhook;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::bus::backend::{BackendCall, BackendFailure, BackendReply, BackendRequest, CallOutcome, CallRoute};
use crate::bus::{Endpoint, Message, Shared, Wakeup};
use crate::config::Config;

/// Starts the backend thread on its bus endpoint.
/// `admin_gateway` is the admin gateway's bus index (where calls for
/// admin-connection handlers go).
pub fn start(
    config: Arc<Config>,
    shared: Arc<Shared>,
    bus: Endpoint,
    admin_gateway: usize,
) -> Result<std::thread::JoinHandle<()>, String> {
    let rpc = &config.rpc;
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(rpc.queue_max);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let done_wakeup = Arc::new(Wakeup::new().map_err(|e| format!("backend thread: {e}"))?);
    let caller = Arc::new(webhook::Caller::new(rpc));
    for worker in 0..rpc.concurrency_max {
        let jobs = jobs_rx.clone();
        let done = done_tx.clone();
        let wakeup = Arc::clone(&done_wakeup);
        let caller = Arc::clone(&caller);
        std::thread::Builder::new()
            .name(format!("kometa-webhook-{worker}"))
            .spawn(move || {
                // Ends when the backend thread drops the job queue.
                for job in jobs {
                    let outcome = caller.call(&job.url, &job.request);
                    if done.send(Done { job, outcome }).is_err() {
                        break;
                    }
                    wakeup.signal();
                }
            })
            .map_err(|e| format!("cannot start a webhook worker: {e}"))?;
    }
    let gateway = BackendGateway {
        config,
        shared,
        bus,
        admin_gateway,
        jobs: Some(jobs_tx),
        done: done_rx,
        done_wakeup,
        breakers: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("kometa-backend".into())
        .spawn(move || gateway.run())
        .map_err(|e| format!("cannot start the backend thread: {e}"))
}

/// A call on its way to a worker.
struct Job {
    url: Arc<str>,
    request: BackendRequest,
}

/// A worker's result.
struct Done {
    job: Job,
    outcome: webhook::Outcome,
}

/// A URL's circuit breaker.
#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    /// Open until then: calls fail at once.
    open_until: Option<Instant>,
    /// Half-open: one trial call is out; the others still fail at once.
    trial_out: bool,
}

impl Breaker {
    /// Whether a call may go out now.
    fn admit(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if self.trial_out => false,
            Some(_) => {
                self.trial_out = true;
                true
            }
        }
    }

    fn record(&mut self, failed: bool, now: Instant, failures_max: u32, open_for: Duration) {
        self.trial_out = false;
        if !failed {
            self.consecutive_failures = 0;
            self.open_until = None;
            return;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= failures_max || self.open_until.is_some() {
            if self.open_until.is_none() {
                tracing::warn!(failures = self.consecutive_failures, "backend failing: circuit breaker open");
            }
            self.open_until = Some(now + open_for);
        }
    }
}

struct BackendGateway {
    config: Arc<Config>,
    shared: Arc<Shared>,
    bus: Endpoint,
    /// The admin gateway's bus index.
    admin_gateway: usize,
    /// None once stopping: the workers see the queue close and exit.
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    done_wakeup: Arc<Wakeup>,
    breakers: HashMap<Arc<str>, Breaker>,
}

impl BackendGateway {
    fn run(mut self) {
        let bus_wakeup_fd = self.bus.wakeup().fd();
        loop {
            if let Ok(config) = self.shared.config.read() {
                if !Arc::ptr_eq(&config, &self.config) {
                    // Routes and proxy URLs follow a reload; pool sizes need a restart.
                    self.config = Arc::clone(&config);
                }
            }
            let mut work = 0;
            let mut requests = Vec::new();
            work += self.bus.receive(4096, |_, message| match message {
                Message::Backend(request) => requests.push(*request),
                other => tracing::warn!(?other, "backend thread: unexpected message"),
            });
            for request in requests {
                self.dispatch(request);
            }
            while let Ok(done) = self.done.try_recv() {
                work += 1;
                self.finish(done);
            }
            self.bus.flush();
            if self.shared.gateway_stop.load(Ordering::Acquire) {
                self.jobs = None;
                break;
            }
            if work > 0 {
                continue;
            }
            let bus_wakeup = self.bus.wakeup();
            bus_wakeup.prepare_park();
            self.done_wakeup.prepare_park();
            if self.bus.has_inbound() || !self.done.is_empty() || self.shared.gateway_stop.load(Ordering::Acquire) {
                self.bus.wakeup().cancel_park();
                self.done_wakeup.cancel_park();
                continue;
            }
            let mut fds = [
                libc::pollfd { fd: bus_wakeup_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.done_wakeup.fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: polls two descriptors we own through a valid array.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1_000) };
            self.bus.wakeup().drain();
            self.done_wakeup.drain();
        }
    }

    /// Routes a call to its URL and queues it, or answers it at once.
    fn dispatch(&mut self, request: BackendRequest) {
        if let BackendCall::Rpc { method, .. } = &request.call {
            if self.handled_on_admin_connection(method) {
                self.bus.send(self.admin_gateway, Message::Backend(Box::new(request)));
                return;
            }
        }
        let rpc = &self.config.rpc;
        let url = match &request.call {
            BackendCall::Rpc { method, .. } => rpc.route(method),
            BackendCall::Connect { .. } => rpc.connect_url.as_deref(),
            BackendCall::Subscribe { .. } => rpc.subscribe_url.as_deref(),
            BackendCall::Publish { .. } => rpc.publish_url.as_deref(),
        };
        let Some(url) = url else {
            let why = match &request.call {
                BackendCall::Rpc { method, .. } => format!("no backend route or handler for method `{method}`"),
                call => format!("no backend URL for {} calls", call.kind()),
            };
            self.shared.backend_calls.count(&request.call, CallRoute::Unrouted, CallOutcome::Unavailable);
            return self.reply(request, Err(BackendFailure::Unavailable(why)));
        };
        let url: Arc<str> = match self.breakers.get_key_value(url) {
            Some((known, _)) => Arc::clone(known),
            None => Arc::from(url),
        };
        let breaker = self.breakers.entry(Arc::clone(&url)).or_default();
        if !breaker.admit(Instant::now()) {
            return self
                .answer(request, Err(BackendFailure::Unavailable("backend failing: circuit breaker open".into())));
        }
        let Some(jobs) = &self.jobs else { return };
        match jobs.try_send(Job { url, request }) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                // A trial call that never went out does not hold the breaker half-open.
                if let Some(breaker) = self.breakers.get_mut(&job.url) {
                    breaker.trial_out = false;
                }
                let why = format!("too many backend calls waiting (rpc.queue_max = {})", self.config.rpc.queue_max);
                self.answer(job.request, Err(BackendFailure::Unavailable(why)));
            }
        }
    }

    /// Whether a connected handler's prefix matches `method` at least as
    /// long as the longest webhook route's does (the handler then wins).
    fn handled_on_admin_connection(&self, method: &str) -> bool {
        if !self.config.rpc.admin_handlers {
            return false;
        }
        let Ok(prefixes) = self.shared.rpc_handler_prefixes.read() else { return false };
        let Some(handled) = prefixes.keys().filter(|prefix| method.starts_with(&***prefix)).map(|p| p.len()).max()
        else {
            return false;
        };
        let routed =
            self.config.rpc.routes.iter().filter(|r| method.starts_with(&r.prefix)).map(|r| r.prefix.len()).max();
        routed.is_none_or(|routed| handled >= routed)
    }

    fn finish(&mut self, done: Done) {
        let Done { job, outcome } = done;
        let rpc = &self.config.rpc;
        if let Some(breaker) = self.breakers.get_mut(&job.url) {
            breaker.record(
                outcome.backend_failed,
                Instant::now(),
                rpc.breaker_failures,
                Duration::from_millis(rpc.breaker_open_ms),
            );
        }
        let open = self.breakers.values().filter(|breaker| breaker.open_until.is_some()).count();
        self.shared.backend_calls.breakers_open.store(open as u64, Ordering::Relaxed);
        self.answer(job.request, outcome.result);
    }

    /// A webhook call's outcome (or its refusal by the queue or the breaker).
    fn answer(&mut self, request: BackendRequest, outcome: Result<Box<serde_json::value::RawValue>, BackendFailure>) {
        self.shared.backend_calls.count(&request.call, CallRoute::Webhook, CallOutcome::of(&outcome));
        self.reply(request, outcome);
    }

    fn reply(&mut self, request: BackendRequest, outcome: Result<Box<serde_json::value::RawValue>, BackendFailure>) {
        let shard = usize::from(request.conn.shard);
        self.bus.send(shard, Message::BackendReply(Box::new(BackendReply { request, outcome })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_consecutive_failures_then_tries_once() {
        let mut breaker = Breaker::default();
        let start = Instant::now();
        let open_for = Duration::from_millis(100);
        for _ in 0..2 {
            assert!(breaker.admit(start));
            breaker.record(true, start, 3, open_for);
        }
        breaker.record(false, start, 3, open_for);
        assert_eq!(breaker.consecutive_failures, 0, "a success resets the count");
        for _ in 0..3 {
            assert!(breaker.admit(start));
            breaker.record(true, start, 3, open_for);
        }
        assert!(!breaker.admit(start + Duration::from_millis(50)), "open");
        let later = start + Duration::from_millis(150);
        assert!(breaker.admit(later), "half-open: one trial");
        assert!(!breaker.admit(later), "only one trial at a time");
        breaker.record(true, later, 3, open_for);
        assert!(!breaker.admit(later + Duration::from_millis(50)), "the trial failed: open again");
        let later = later + Duration::from_millis(150);
        assert!(breaker.admit(later));
        breaker.record(false, later, 3, open_for);
        assert!(breaker.admit(later) && breaker.admit(later), "closed again");
    }
}
