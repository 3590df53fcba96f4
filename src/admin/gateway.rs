//! The admin gateway: the admin socket's own thread, an extra endpoint of
//! the bus (index = the number of shards). It sends each request to the
//! shard that owns its channel or user and waits for the answers there.
//!
//! Keeping it off the shards means no shard runs anything but its event
//! loop, so every shard can sleep in `epoll_wait` (measured: a shard that
//! also served admin tasks and slept in glommio's reactor used 50-75% more
//! CPU per WebSocket handshake), and admin traffic never competes with a
//! shard's sockets. It runs a glommio executor of its own for the
//! per-connection async code.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_channel::oneshot;

use crate::admin::sys;
use crate::bus::message::{PublishOk, PublishRefusal, QueryAnswer, ReplyTo};
use crate::bus::metrics::RefusalCounts;
use crate::bus::query::Answer;
use crate::bus::Shared;
use crate::bus::{Endpoint, Message};
use crate::config::Config;

/// What an admin request is waiting for.
pub enum AdminWait {
    Publish(oneshot::Sender<Result<PublishOk, PublishRefusal>>),
    /// Answers from `remaining` more shards.
    Gather {
        remaining: usize,
        answers: Vec<Answer>,
        reply: oneshot::Sender<Vec<Answer>>,
    },
}

pub struct Gateway {
    pub config: Arc<Config>,
    pub shared: Arc<Shared>,
    pub bus: Endpoint,
    /// The gateway's bus index (= the number of shards).
    pub id: usize,
    shard_count: usize,
    /// Cluster mode: the cluster gateway's bus index.
    pub cluster: Option<usize>,
    /// Requests waiting for shards, by token.
    pub admin_waits: HashMap<u64, AdminWait>,
    next_token: u64,
    /// Publications refused to the backend (admin socket, HTTP API), by reason.
    pub refusals: RefusalCounts,
    /// Where RELOAD re-reads the configuration (the server's file and
    /// flags); None when the server was started without one (tests).
    pub reload_source: Option<crate::admin::reload::ConfigSource>,
    /// Admin connections answering client `rpc` calls (admin/handlers.rs).
    pub handlers: crate::admin::handlers::Handlers,
}

impl Gateway {
    /// After a reload: the new configuration (admin limits, keys, ...).
    fn take_reloaded_config(&mut self) {
        if let Ok(config) = self.shared.config.read() {
            if !Arc::ptr_eq(&config, &self.config) {
                self.config = Arc::clone(&config);
            }
        }
    }

    pub fn new(config: Arc<Config>, shared: Arc<Shared>, bus: Endpoint, shard_count: usize) -> Gateway {
        let id = bus.shard();
        debug_assert_eq!(id, shard_count);
        let cluster = config.cluster.enabled().then_some(shard_count + 1);
        Gateway {
            config,
            shared,
            bus,
            id,
            shard_count,
            cluster,
            admin_waits: HashMap::new(),
            next_token: 1,
            refusals: RefusalCounts::default(),
            reload_source: None,
            handlers: Default::default(),
        }
    }

    /// Shards owning channels and users (the gateway is not one).
    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    pub fn admin_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    pub fn is_draining(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::PublishReply(reply) => {
                let (reply_to, result) = *reply;
                if let Err(refusal) = result {
                    self.refusals.refused(refusal);
                }
                if let ReplyTo::Admin { token, .. } = reply_to {
                    if let Some(AdminWait::Publish(sender)) = self.admin_waits.remove(&token) {
                        let _ = sender.send(result);
                    }
                }
            }
            Message::Answer(answer) => {
                let QueryAnswer { reply, answer } = *answer;
                let ReplyTo::Admin { token, .. } = reply else { return };
                let Some(AdminWait::Gather { remaining, answers, .. }) = self.admin_waits.get_mut(&token) else {
                    return;
                };
                answers.push(answer);
                *remaining -= 1;
                if *remaining == 0 {
                    if let Some(AdminWait::Gather { answers, reply, .. }) = self.admin_waits.remove(&token) {
                        let _ = reply.send(answers);
                    }
                }
            }
            Message::Backend(request) => self.call_handler(*request),
            other => debug_assert!(false, "the admin gateway got {other:?}"),
        }
    }
}

/// Delivers bus messages to waiting admin requests until the server stops.
pub async fn run(gateway: Rc<RefCell<Gateway>>) {
    let (wakeup_fd, shared, id) = {
        let gateway = gateway.borrow();
        (gateway.bus.wakeup().fd(), Arc::clone(&gateway.shared), gateway.id)
    };
    let wakeup = &shared.wakeups[id];
    loop {
        let handled = {
            let mut gateway = gateway.borrow_mut();
            gateway.take_reloaded_config();
            let mut batch = Vec::new();
            gateway.bus.receive(4096, |_, message| batch.push(message));
            let count = batch.len();
            for message in batch {
                gateway.handle(message);
            }
            gateway.bus.flush();
            count
        };
        if shared.gateway_stop.load(Ordering::Acquire) {
            break;
        }
        if handled > 0 {
            futures_lite::future::yield_now().await;
            continue;
        }
        wakeup.prepare_park();
        if gateway.borrow().bus.has_inbound() || shared.gateway_stop.load(Ordering::Acquire) {
            wakeup.cancel_park();
            continue;
        }
        sys::readable(wakeup_fd).await;
        wakeup.drain();
    }
}
