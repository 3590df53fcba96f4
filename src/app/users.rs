//! Users across shards: a connection with a verified token registers with
//! its user's owner (which counts connections, keeps last-seen time, the
//! inbox and revocations), and the owner reaches the user's connections on
//! any shard through each shard's local user index.
//!
//! Ordering: the owner's registration reply and later messages for the user
//! travel on the same FIFO queue, so a new connection gets the inbox replay
//! first and every later message exactly once.

use std::sync::Arc;

use crate::bus::message::{ConnRef, PublishRequest, ReplyTo, UserConnectReply, UserConnectRequest};
use crate::bus::Message;
use crate::config::user_status_channel;
use crate::connection::outbox::{OutItem, Wire};
use crate::connection::Marks;
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::hub::publication::Publication;
use crate::hub::user::Refused;
use crate::limits::LimitKind;
use crate::shard::Shard;
use crate::util::unix_time_ms;
use kometa_protocol::client::{CommandError, ErrorCode, RequestId};
use kometa_protocol::token::Identity;
use kometa_protocol::ws;

impl Shard {
    /// A token checked out: remember who the connection is and register it
    /// with the user's owner; input pauses until the owner answers.
    pub(crate) fn register_user(
        &mut self,
        key: ConnKey,
        generation: u32,
        identity: Identity,
        request_id: Option<RequestId>,
        via_command: bool,
    ) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        let user = Arc::clone(&identity.user);
        let issued_at_s = identity.issued_at_s;
        conn.state.identity = Some(Box::new(identity));
        conn.state.marks.insert(Marks::AWAITING_REPLY);
        self.metrics.authenticated += 1;
        let owner = owner_of(&user, self.shard_count());
        let request = UserConnectRequest {
            user,
            conn: ConnRef { shard: self.id as u16, key, generation },
            issued_at_s,
            request_id,
            via_command,
        };
        self.bus.send(owner, Message::UserConnect(Box::new(request)));
    }

    pub(crate) fn owner_user_connect(&mut self, request: UserConnectRequest) {
        let shard = usize::from(request.conn.shard);
        let result = self.users.connect(&request.user, shard, request.issued_at_s, unix_time_ms());
        let (came_online, result) = match result {
            Ok((came_online, inbox)) => (came_online, Ok(inbox)),
            Err(refused) => (false, Err(refused)),
        };
        let user = Arc::clone(&request.user);
        let reply = UserConnectReply {
            conn: request.conn,
            user: request.user,
            request_id: request.request_id,
            via_command: request.via_command,
            result,
        };
        self.bus.send(shard, Message::UserConnectReply(Box::new(reply)));
        if came_online {
            self.status_event(&user, "online", None);
        }
    }

    pub(crate) fn owner_user_disconnect(&mut self, user: &str, shard: usize) {
        let now_ms = unix_time_ms();
        if self.users.disconnect(user, shard, now_ms) {
            self.status_event(user, "offline", Some(now_ms / 1000));
        }
    }

    /// Publishes `online`/`offline` to `user_status_<user>`, if that channel exists.
    fn status_event(&mut self, user: &str, event: &str, last_seen_s: Option<u64>) {
        if !self.config.users.status_events {
            return;
        }
        let channel: Arc<str> = user_status_channel(user).into();
        let mut data = serde_json::json!({ "user": user });
        if let Some(last_seen_s) = last_seen_s {
            data["last_seen"] = last_seen_s.into();
        }
        let request = PublishRequest {
            channel: Arc::clone(&channel),
            event: event.into(),
            data: data.to_string().into_bytes().into_boxed_slice(),
            user: None,
            reply: ReplyTo::Nobody,
            only_if_exists: true,
        };
        self.bus.send(owner_of(&channel, self.shard_count()), Message::Publish(Box::new(request)));
    }

    pub(crate) fn user_connect_reply(&mut self, reply: UserConnectReply) {
        let UserConnectReply { conn, user, request_id, via_command, result } = reply;
        let (key, generation) = (conn.key, conn.generation);
        if !self.alive(key, generation) {
            if result.is_ok() {
                let owner = owner_of(&user, self.shard_count());
                self.bus.send(owner, Message::UserDisconnect { user, shard: self.id as u16 });
            }
            return;
        }
        match result {
            Ok(inbox) => {
                if let Some(conn) = self.conn_mut(key, generation) {
                    conn.state.marks.insert(Marks::REGISTERED);
                }
                self.users_local.entry(Arc::clone(&user)).or_default().push(key);
                if via_command {
                    self.reply_ok(key, request_id.as_ref(), |object| {
                        object.str("user", &user);
                    });
                }
                for push in inbox {
                    self.send_item(key, OutItem::Publication(push, Wire::WebSocket));
                }
                self.unpause(key, generation);
            }
            Err(refused) => {
                let (code, close_code, message) = match refused {
                    Refused::Revoked => (ErrorCode::Unauthorized, ws::close::INVALID_TOKEN, "token revoked".into()),
                    Refused::TooManyConnections => {
                        self.metrics.limit_refusals.add(LimitKind::ConnectionsPerUser);
                        let max = self.config.limits.connections_per_user_max;
                        let message =
                            format!("this user has {max} connections already (limits.connections_per_user_max)");
                        (ErrorCode::TooManyConnections, ws::close::TOO_MANY_CONNECTIONS, message)
                    }
                };
                // Like any other bad token on `connect`: the reply says why,
                // then the close (a token in the URL gets only the close).
                if via_command {
                    self.reply_error(key, &CommandError::new(request_id, code, message.clone()));
                }
                self.close_websocket(key, close_code, &message);
                // Read on, so the client's close reply completes the handshake
                // (paused, the connection would wait out close_timeout_ms).
                self.unpause(key, generation);
            }
        }
    }

    /// Writes a user message to this shard's connections of `user`.
    pub(crate) fn user_deliver(&mut self, user: &str, push: &Arc<Publication>) {
        let keys = self.users_local.get(user).cloned().unwrap_or_default();
        for key in keys {
            self.deliver(key, push);
        }
    }

    /// Closes this shard's connections of `user` (admin DISCONNECT).
    pub(crate) fn close_user(&mut self, user: &str, code: u16, reason: &str) {
        let keys = self.users_local.get(user).cloned().unwrap_or_default();
        for key in keys {
            self.close_websocket(key, code, reason);
        }
    }

    /// Forgets a closing connection's registration.
    pub(crate) fn unregister_user(&mut self, key: ConnKey, user: &Arc<str>) {
        if let Some(keys) = self.users_local.get_mut(&**user) {
            keys.retain(|&k| k != key);
            if keys.is_empty() {
                self.users_local.remove(&**user);
            }
        }
        let owner = owner_of(user, self.shard_count());
        self.bus.send(owner, Message::UserDisconnect { user: Arc::clone(user), shard: self.id as u16 });
    }
}
