// Type declarations for kometa.js, the browser client of the Kometa push
// server (client protocol v1, docs/client-protocol.md).
//
// Classic script: <script src="/kometa.js"></script> defines `Kometa` globally.
// ES module:      import Kometa from "/kometa.mjs"  (or { Kometa, KometaError }).

export = Kometa;
export as namespace Kometa;

declare const Kometa: Kometa.Static;

declare namespace Kometa {
  type Transport = "websocket" | "sse" | "longpoll";

  /** Any JSON value: publication and message data. */
  type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

  /** A channel position: its epoch (changes when history is lost) and the offset of a publication. */
  interface Position {
    epoch: string;
    offset: number;
  }

  interface Options {
    /**
     * Connection token (HS256 JWT minted by your backend), or a function returning one.
     * A function is called again when the token is about to expire (and is then presented
     * on the open connection) and after the server refused a token; a string token that
     * the server refuses closes the client (state "closed", error "unauthorized").
     */
    token?: string | null | (() => string | Promise<string>);
    /** Transports to use, best first. Default ["websocket", "sse", "longpoll"]. */
    transports?: Transport | Transport[];
    /**
     * Share one connection among the tabs of this origin (default true). A string is a
     * share name: only clients with the same server URL and name share. Tabs with string
     * tokens of different users never share. false: this tab has its own connection.
     */
    share?: boolean | string;
    /** Milliseconds to wait for a reply once a command is sent (default 10000). */
    timeout?: number;
    /** Commands held while offline; more are rejected with "queue_full" (default 100). */
    queueSize?: number;
    /** Milliseconds a command may wait offline before it is rejected with "timeout" (default 30000). */
    queueTimeout?: number;
    /** Milliseconds a transport has to open and answer its first command before the next is tried (default 6000). */
    openTimeout?: number;
    /** Reconnect delay: capped exponential backoff with jitter between these (defaults 500 and 30000 ms). */
    reconnectDelayMin?: number;
    reconnectDelayMax?: number;
    /**
     * After falling back to a worse transport, try the better one again after this many
     * milliseconds, doubling after each failed try up to 10 minutes (default 60000; 0: never).
     */
    upgradeDelay?: number;
    /** Send a ping after this long without any message (default 25000 ms)... */
    pingInterval?: number;
    /** ...and reconnect when it is not answered within this (default 10000 ms). */
    pingTimeout?: number;
    /** Client-side limit of one long-poll request (default 40000 ms; the server answers within 25 s). */
    pollTimeout?: number;
    /** A user message is acknowledged at the latest this long after it was handed to the tabs (default 15000 ms). */
    inboxTimeout?: number;
    /** Log transport decisions to console.debug. */
    debug?: boolean;
    /** Implementations for non-browser environments (default: the globals). */
    WebSocket?: unknown;
    EventSource?: unknown;
    fetch?: typeof fetch;
  }

  /** A publication (or a presence event) on a channel. */
  interface Publication<D = Json> {
    channel: string;
    /** "join", "leave" and "presence_counts" (data: PresenceCounts) are presence events. */
    event: string;
    /** Absent on presence events, which are not kept in history. */
    offset?: number;
    data: D;
    /** The sender's user id, when it published with a token. */
    user?: string;
  }

  /** A message to the user (backend SEND_USER). */
  interface UserMessage<D = Json> {
    /** Inbox sequence number; absent when the server could not keep the message (inbox full). */
    inbox?: number;
    event: string;
    data: D;
  }

  type State = "connecting" | "connected" | "disconnected" | "reconnecting" | "closed";

  interface StateEvent {
    state: State;
    /** The transport in use, when connected. */
    transport: Transport | null;
    /** The authenticated user id, or null. */
    user: string | null;
    /** "standalone" (own connection), "leader" (runs the shared connection) or "follower". */
    role: Role;
    /** connected: true when an HTTP session survived the disconnect (nothing needed resubscribing). */
    resumed?: boolean;
    /** connected: true when a better transport replaced the current one. */
    upgraded?: boolean;
    /** reconnecting: the attempt number and the delay before it, in ms. */
    attempt?: number;
    delay?: number;
    /** disconnected / closed: close code (number) or error code (string), and why. */
    code?: number | string;
    reason?: string;
  }

  type Role = "standalone" | "leader" | "follower";

  /** After a reconnect (or a takeover by another tab), whether a channel's missed publications were all delivered. */
  interface RecoveryEvent {
    channel: string;
    /** false: publications were missed; reload the state of this channel (for example with history()). */
    recovered: boolean;
    /** "epoch_changed", "history_too_short", "offset_ahead", ... when not recovered. */
    reason?: string;
    epoch: string;
    offset: number;
  }

  interface SubscribeOptions {
    /**
     * Only publications with this event name ("*": all). When omitted, "channel.event"
     * is split at its last dot; pass event: "*" to subscribe to a channel whose name
     * contains a dot.
     */
    event?: string;
    /** Start after this position (for example one saved from Subscription.position). */
    since?: Position;
    /**
     * Also receive "presence_counts" events (data: PresenceCounts) whenever the channel's
     * presence changes, at most one per timeouts.presence_counts_interval_ms (1 s), so a page
     * need not poll for an online count. Channels whose namespace keeps presence only
     * (track_ by default); not in cluster mode. Stays on while the channel is subscribed.
     */
    presenceCounts?: boolean;
  }

  /** The data of a "presence_counts" event. */
  interface PresenceCounts {
    /** Users with at least one connection subscribed. */
    users: number;
    /** Subscribed connections, users' and anonymous. */
    connections: number;
    /** Anonymous connections among them. */
    anonymous: number;
  }

  interface PresenceOptions {
    /** Continue after this user id (the previous page's `next`). */
    cursor?: string | null;
    /** Members per page (default and at most limits.query_items_max, 1000). */
    limit?: number;
  }

  interface Subscription {
    readonly channel: string;
    /** The event filter, "*" for all. */
    readonly event: string;
    /** false once unsubscribed, or when the server refused the subscription. */
    readonly active: boolean;
    /** Resolves with the starting position once subscribed; rejects (KometaError) when refused. */
    readonly ready: Promise<Position>;
    /** The position of the last publication delivered on this channel. */
    readonly position: Position | null;
    unsubscribe(): void;
  }

  interface Reply {
    ok: true;
    [key: string]: unknown;
  }
  interface PublishReply extends Reply {
    offset: number;
  }
  interface PresenceReply extends Reply {
    channel: string;
    members: { user: string; connections: number }[];
    anonymous: number;
    next: string | null;
  }
  interface PresenceStatsReply extends Reply {
    channel: string;
    users: number;
    connections: number;
    anonymous: number;
  }
  interface HistoryOptions {
    since?: Position | null;
    limit?: number;
  }
  interface HistoryReply extends Reply {
    channel: string;
    epoch: string;
    offset: number;
    publications: Publication[];
    /** Pass as since.offset for the next page; null on the last page. */
    next: number | null;
    /** The `since` epoch was not the channel's current one: the oldest retained publications follow. */
    epoch_changed?: boolean;
  }

  interface Client {
    readonly id: string;
    readonly state: State;
    readonly transport: Transport | null;
    readonly user: string | null;
    readonly role: Role | null;
    readonly options: Readonly<Options>;

    /** Publications of a channel, in order, each exactly once; "news.update" is channel news, event update. */
    subscribe<D = Json>(channel: string, callback: (msg: Publication<D>) => void, options?: SubscribeOptions): Subscription;
    /** Publish (clients may publish to web_ channels by default). Resolves with the publication's offset. */
    publish(channel: string, event: string | null | undefined, data: unknown): Promise<PublishReply>;
    /** Asks the backend through the server (`[rpc]` routes); resolves with the backend's `result`. */
    rpc(method: string, data?: unknown): Promise<unknown>;
    /** One page of members, in user-id order; `next` is the cursor of the next page. */
    presence(channel: string, options?: PresenceOptions): Promise<PresenceReply>;
    presenceStats(channel: string): Promise<PresenceStatsReply>;
    history(channel: string, options?: HistoryOptions): Promise<HistoryReply>;
    ping(): Promise<Reply>;

    /**
     * Messages to the user (needs a token). Each is acknowledged once every handler has
     * returned (and a returned promise has settled), so it is not delivered again, even
     * after a reload. Messages arriving before any handler exists are held. Returns a
     * function that removes the handler.
     */
    onMessage<D = Json>(callback: (msg: UserMessage<D>) => void | Promise<unknown>): () => void;

    on(name: "state", callback: (e: StateEvent) => void): () => void;
    on(name: "recovery", callback: (e: RecoveryEvent) => void): () => void;
    on(name: "error", callback: (e: KometaError) => void): () => void;
    on(name: "role", callback: (e: { role: Role }) => void): () => void;
    off(name: string, callback: (...args: any[]) => void): void;

    /** Unsubscribe everything and leave; the leader tab hands the connection to another tab. */
    close(): void;
  }

  interface KometaError extends Error {
    readonly name: "KometaError";
    /**
     * A server error code (bad_request, forbidden, unauthorized, token_expired, rate_limited, ...) or a
     * client one: timeout, connection_lost (the connection dropped before the reply of a
     * command that is not safe to repeat), queue_full, closed, unsubscribed, disconnected.
     */
    readonly code: string;
    /** For subscription errors: the channel. */
    channel?: string;
  }

  interface KometaErrorConstructor {
    new (code: string, message?: string): KometaError;
    readonly prototype: KometaError;
  }

  interface Endpoints {
    base: string;
    ws: string;
    sse: string;
    poll: string;
    cmd: string;
  }

  interface Static {
    readonly version: string;
    readonly protocol: "kometa.v1";
    readonly defaults: Readonly<Required<Pick<Options,
      "transports" | "share" | "timeout" | "queueSize" | "queueTimeout" | "openTimeout" | "reconnectDelayMin" |
      "reconnectDelayMax" | "upgradeDelay" | "pingInterval" | "pingTimeout" | "pollTimeout" | "inboxTimeout" | "debug">>>;
    /**
     * Connect to a Kometa server: its base URL ("https://push.example.com"), or any of its
     * endpoints ("wss://push.example.com/ws"); empty: this page's origin.
     */
    connect(url?: string, options?: Options): Client;
    readonly Client: new (url?: string, options?: Options) => Client;
    readonly KometaError: KometaErrorConstructor;
    endpoints(url?: string): Endpoints;
    /** The same object, for `import { Kometa } from "/kometa.mjs"` and `import Kometa from ...`. */
    readonly Kometa: Static;
    readonly default: Static;
  }
}
