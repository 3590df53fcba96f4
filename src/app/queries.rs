//! Queries answered by an owner shard (presence, status, history, channel
//! listings, user messages, disconnects) and how answers reach the admin
//! request or client command that asked.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::bus::message::{QueryAnswer, ReplyTo};
use crate::bus::query::{Answer, Failure, FailureKind, Query};
use crate::bus::Message;
use crate::hub::publication::Publication;
use crate::hub::user::Status;
use crate::shard::Shard;
use crate::util::unix_time_ms;
use kometa_protocol::client::CommandError;

fn object(value: Value) -> Answer {
    match value {
        Value::Object(map) => Answer::Object(map),
        _ => Answer::Object(Map::new()),
    }
}

impl Shard {
    pub(crate) fn answer_query(&mut self, query: Query, _reply: &ReplyTo) -> Answer {
        match query {
            Query::Stats => Answer::Stats(Box::new(self.stats())),
            Query::Metrics => Answer::Metrics(Box::new(self.metrics_snapshot())),
            Query::NodeStats => Failure::answer(FailureKind::BadArgument, "node stats come from the cluster gateway"),
            Query::SendUser { items, event, data } => self.send_users(items, &event, &data),
            Query::UserStatus { items } => Answer::Rows(
                items
                    .into_iter()
                    .map(|(index, user)| {
                        let row = match self.users.status(&user) {
                            Status::Online { connections } => {
                                json!({"user": &*user, "status": "online", "connections": connections})
                            }
                            Status::Offline { last_seen_ms } => {
                                json!({"user": &*user, "status": "offline", "last_seen": last_seen_ms / 1000})
                            }
                            Status::Unknown => json!({"user": &*user, "status": "unknown"}),
                        };
                        (index, row)
                    })
                    .collect(),
            ),
            Query::Presence { channel, cursor, limit } => {
                if let Some(refusal) = self.presence_refusal(&channel) {
                    return refusal;
                }
                let (members, next, anonymous) = match self.owned.get(&channel) {
                    Some(state) => {
                        let (members, next) = state.presence.page(cursor.as_deref(), limit);
                        (members, next, state.presence.stats().anonymous_connections)
                    }
                    None => (Vec::new(), None, 0),
                };
                let members: Vec<Value> = members
                    .iter()
                    .map(|(user, connections)| json!({"user": &**user, "connections": connections}))
                    .collect();
                object(
                    json!({"channel": &*channel, "members": members, "anonymous": anonymous, "next": next.as_deref()}),
                )
            }
            Query::PresenceStats { channel } => {
                if let Some(refusal) = self.presence_refusal(&channel) {
                    return refusal;
                }
                let stats = self.owned.get(&channel).map(|state| state.presence.stats());
                object(json!({
                    "channel": &*channel,
                    "users": stats.map_or(0, |s| s.users),
                    "connections": stats.map_or(0, |s| s.connections),
                    "anonymous": stats.map_or(0, |s| s.anonymous_connections),
                }))
            }
            Query::ChannelInfo { channel } => match self.owned.get(&channel) {
                Some(state) => object(json!({
                    "channel": &*channel,
                    "exists": true,
                    "subscribers": state.subscribers,
                    "epoch": &*state.epoch,
                    "offset": state.last_offset,
                    "history": state.history.len(),
                    "presence_users": state.presence.stats().users,
                })),
                None => object(json!({"channel": &*channel, "exists": false, "subscribers": 0})),
            },
            Query::Channels { prefix, cursor, limit } => {
                let mut page: Vec<(Arc<str>, u64)> = self
                    .owned
                    .iter()
                    .filter(|c| c.name.starts_with(&*prefix) && cursor.as_deref().is_none_or(|after| &*c.name > after))
                    .map(|c| (Arc::clone(&c.name), c.subscribers))
                    .collect();
                page.sort_by(|a, b| a.0.cmp(&b.0));
                page.truncate(limit + 1);
                Answer::Channels(page)
            }
            Query::History { channel, since_epoch, since_offset, limit } => {
                self.history(&channel, since_epoch.as_deref(), since_offset, limit)
            }
            Query::Disconnect { user, code, reason, revoke_before_s } => {
                let (connections, shards) = if revoke_before_s > 0 {
                    self.users.revoke(&user, revoke_before_s, unix_time_ms())
                } else {
                    self.users.connections(&user)
                };
                for shard in shards {
                    self.bus
                        .send(shard, Message::CloseUser { user: Arc::clone(&user), code, reason: Arc::clone(&reason) });
                }
                object(json!({"user": &*user, "disconnected": connections}))
            }
        }
    }

    /// Presence is kept only where the namespace asks for it.
    pub(crate) fn presence_refusal(&self, channel: &str) -> Option<Answer> {
        let namespace = self.config.namespace_for(channel);
        (!namespace.presence).then(|| {
            Failure::answer(
                FailureKind::Forbidden,
                format!("presence is not kept for this channel (namespace prefix `{}`)", namespace.prefix),
            )
        })
    }

    fn send_users(&mut self, items: Vec<(u32, Arc<str>)>, event: &str, data: &[u8]) -> Answer {
        let now_ms = unix_time_ms();
        let mut rows = Vec::with_capacity(items.len());
        for (index, user) in items {
            let (outcome, push) =
                self.users.send(&user, now_ms, |seq| Arc::new(Publication::user_message(seq, event, data)));
            for shard in &outcome.shards {
                self.bus.send(*shard, Message::UserDeliver { user: Arc::clone(&user), push: Arc::clone(&push) });
            }
            let mut row = json!({
                "user": &*user,
                "delivered": outcome.delivered,
                "stored": outcome.stored.is_some(),
                "inbox_full": outcome.inbox_full,
            });
            if let Some(seq) = outcome.stored {
                row["inbox"] = seq.into();
            }
            rows.push((index, row));
        }
        Answer::Rows(rows)
    }

    fn history(&self, channel: &str, since_epoch: Option<&str>, since_offset: u64, limit: usize) -> Answer {
        let Some(state) = self.owned.get(channel) else {
            return object(
                json!({"channel": channel, "epoch": Value::Null, "offset": 0, "publications": [], "next": Value::Null}),
            );
        };
        let epoch_changed = since_epoch.is_some_and(|epoch| epoch != &*state.epoch);
        let after = if epoch_changed { 0 } else { since_offset };
        // A reply must also fit comfortably in a client's outbox.
        let limits = &self.config.limits;
        let budget = limits.query_reply_bytes_max.min(limits.outbox_bytes_max / 2);
        let mut used = 0;
        let mut publications = Vec::new();
        let mut last_included = None;
        for publication in state.history.after(after, limit) {
            used += publication.json().len();
            if used > budget && !publications.is_empty() {
                break;
            }
            publications.push(serde_json::from_slice::<Value>(publication.json()).unwrap_or(Value::Null));
            last_included = Some(publication.offset);
        }
        // History holds contiguous offsets up to the last one: anything
        // after the last included publication is the next page.
        let next = last_included.filter(|&offset| offset < state.last_offset);
        let mut answer = json!({
            "channel": channel,
            "epoch": &*state.epoch,
            "offset": state.last_offset,
            "publications": publications,
            "next": next,
        });
        if epoch_changed {
            answer["epoch_changed"] = true.into();
        }
        object(answer)
    }

    /// An answer came back to the shard that asked.
    pub(crate) fn receive_answer(&mut self, answer: QueryAnswer) {
        let QueryAnswer { reply, answer } = answer;
        match reply {
            // Admin answers go to the admin gateway's endpoint, never to a shard.
            ReplyTo::Admin { .. } => debug_assert!(false, "a shard got an admin answer"),
            ReplyTo::Client { conn, request_id } => {
                let (key, generation) = (conn.key, conn.generation);
                if !self.alive(key, generation) {
                    return;
                }
                match answer {
                    Answer::Object(fields) => self.reply_ok(key, request_id.as_ref(), |object| {
                        for (name, value) in &fields {
                            object.raw(name, &serde_json::to_vec(value).unwrap_or_default());
                        }
                    }),
                    Answer::Failed(failure) => {
                        let error = CommandError::new(request_id, failure.client_code(), failure.message);
                        self.reply_error(key, &error);
                    }
                    _ => {
                        crate::limited!(ERROR, "client query answered with an unexpected kind");
                    }
                }
                self.unpause(key, generation);
            }
            ReplyTo::Nobody => {}
        }
    }
}
