<?php
/**
 * Kometa admin client: PHP 7.4+ / 8.x, core only (no extensions).
 *
 * Talks the binary admin protocol (docs/admin-protocol.md) over a Unix socket
 * or TCP. Install: copy this file and `require_once` it.
 *
 *     $admin = new KometaAdmin('unix:/run/kometa/admin.sock');
 *     $admin->publish('news', 'update', ['title' => 'hi']);   // ['offset' => 1, ...]
 *     $results = $admin->pipeline(function (KometaPipeline $p) {
 *         for ($n = 0; $n < 100; $n++) {
 *             $p->publish('news', 'n', $n);
 *         }
 *     });                                   // in order; errors as KometaException
 *
 * Server errors throw KometaException (getCode(): the protocol's code, ->name,
 * getMessage()). Transport failures and replies that break the protocol throw
 * KometaConnectionException; the connection is then dropped and the next call
 * reconnects (a failed request is never re-sent: PUBLISH is not idempotent).
 * JSON documents are returned as associative arrays (so `{}` reads as `[]`).
 */

declare(strict_types=1);

/** An error reply from the server. getCode() is the protocol's error code. */
class KometaException extends Exception
{
    public const NAMES = [
        1 => 'bad_frame',
        2 => 'unknown_opcode',
        3 => 'bad_argument',
        4 => 'unauthorized',
        5 => 'overloaded',
        6 => 'too_large',
        7 => 'not_found',
        8 => 'inbox_full',
        9 => 'shutting_down',
        10 => 'internal',
        11 => 'limit_reached',
        12 => 'unavailable',
        13 => 'unknown_outcome',
    ];

    /** @var string the error's name, for example "bad_argument" */
    public $name;

    public function __construct(int $code, string $message, ?string $name = null)
    {
        parent::__construct($message, $code);
        $this->name = $name ?? (self::NAMES[$code] ?? "error_$code");
    }

    public function getName(): string
    {
        return $this->name;
    }

    public function __toString(): string
    {
        return sprintf('%s (%d): %s', $this->name, $this->getCode(), $this->getMessage());
    }
}

/**
 * Thrown by an rpc handler (KometaAdmin::serveRpc): the client gets
 * `backend_error` with this code and message.
 */
class KometaRpcError extends Exception
{
}

/** The socket failed, timed out, or the server's bytes broke the protocol. */
class KometaConnectionException extends RuntimeException
{
}

/** Data that is already JSON text, sent as it is: new KometaRawJson('{"a":1}'). */
final class KometaRawJson
{
    /** @var string */
    public $json;

    public function __construct(string $json)
    {
        $this->json = $json;
    }
}

/** Every operation, as a request; the class using it decides when it is sent. */
trait KometaOperations
{
    /** @return mixed */
    abstract protected function submit(int $opcode, string $payload, callable $decode);

    /**
     * Publishes $data (any json_encode-able value, or KometaRawJson) to $channel as $event.
     * @return mixed ['offset' => int, 'subscribers' => int, 'epoch' => string]
     */
    public function publish(string $channel, string $event, $data)
    {
        $payload = KometaWire::str16($channel, 'channel') . KometaWire::str16($event, 'event') . KometaWire::data($data);
        return $this->submit(KometaWire::OP_PUBLISH, $payload, [KometaWire::class, 'published']);
    }

    /** Server totals and per-shard counters. */
    /**
     * Publishes the same data to each channel (one offset in each):
     * ['results' => [['channel', 'offset', 'subscribers', 'epoch'] or ['channel', 'error'], ...]].
     * @param string[] $channels
     */
    public function publishMany(array $channels, string $event, $data)
    {
        $payload = KometaWire::users($channels) . KometaWire::str16($event, 'event') . KometaWire::data($data);
        return $this->submit(KometaWire::OP_PUBLISH_MANY, $payload, [KometaWire::class, 'document']);
    }

    /**
     * Server totals and per-shard counters. In cluster mode the cluster's,
     * with every node's under 'nodes'; $nodeOnly: this node's own figures
     * only (a per-node health probe).
     */
    public function stats(bool $nodeOnly = false)
    {
        return $this->submit(KometaWire::OP_STATS, $nodeOnly ? "\x01" : '', [KometaWire::class, 'document']);
    }

    /**
     * Makes the server re-read its configuration (as SIGHUP does):
     * ['reloaded' => true, 'restart_needed' => [keys]]; a refused file
     * throws KometaError bad_argument naming the key.
     */
    public function reload()
    {
        return $this->submit(KometaWire::OP_RELOAD, '', [KometaWire::class, 'document']);
    }

    /**
     * Sends to every connection of each user and stores it in their inboxes.
     * @param string|string[] $users
     */
    public function sendUser($users, string $event, $data)
    {
        $payload = KometaWire::users($users) . KometaWire::str16($event, 'event') . KometaWire::data($data);
        return $this->submit(KometaWire::OP_SEND_USER, $payload, [KometaWire::class, 'document']);
    }

    /** One page of a channel's members; pass the previous page's 'next' as $cursor. */
    public function presence(string $channel, ?string $cursor = '', int $limit = 0)
    {
        $payload = KometaWire::str16($channel, 'channel') . KometaWire::str16($cursor ?? '', 'cursor')
            . KometaWire::u32($limit, 'limit');
        return $this->submit(KometaWire::OP_PRESENCE, $payload, [KometaWire::class, 'document']);
    }

    public function presenceStats(string $channel)
    {
        return $this->submit(KometaWire::OP_PRESENCE_STATS, KometaWire::str16($channel, 'channel'), [KometaWire::class, 'document']);
    }

    /** @param string|string[] $users */
    public function userStatus($users)
    {
        return $this->submit(KometaWire::OP_USER_STATUS, KometaWire::users($users), [KometaWire::class, 'document']);
    }

    public function channelInfo(string $channel)
    {
        return $this->submit(KometaWire::OP_CHANNEL_INFO, KometaWire::str16($channel, 'channel'), [KometaWire::class, 'document']);
    }

    /** One page of existing channels whose names start with $prefix. */
    public function channels(string $prefix = '', ?string $cursor = '', int $limit = 0)
    {
        $payload = KometaWire::str16($prefix, 'prefix') . KometaWire::str16($cursor ?? '', 'cursor')
            . KometaWire::u32($limit, 'limit');
        return $this->submit(KometaWire::OP_CHANNELS, $payload, [KometaWire::class, 'document']);
    }

    /** Retained publications after offset $since (0: all), oldest first. */
    public function history(string $channel, ?int $since = 0, int $limit = 0)
    {
        $payload = KometaWire::str16($channel, 'channel') . KometaWire::u64($since ?? 0, 'since')
            . KometaWire::u32($limit, 'limit');
        return $this->submit(KometaWire::OP_HISTORY, $payload, [KometaWire::class, 'document']);
    }

    /** Closes every connection of $user ($code 0: 4003); $revokeBefore > 0 (Unix seconds) refuses older tokens. */
    public function disconnect(string $user, int $code = 0, string $reason = '', int $revokeBefore = 0)
    {
        $payload = KometaWire::str16($user, 'user') . KometaWire::u16($code, 'code')
            . KometaWire::str16($reason, 'reason') . KometaWire::u64($revokeBefore, 'revokeBefore');
        return $this->submit(KometaWire::OP_DISCONNECT, $payload, [KometaWire::class, 'document']);
    }

    /** true when the server answers. */
    public function ping()
    {
        return $this->submit(KometaWire::OP_PING, '', [KometaWire::class, 'emptyReply']);
    }
}

/** Byte layouts (internal). */
final class KometaWire
{
    public const OP_AUTH = 0x01;
    public const OP_PUBLISH = 0x02;
    public const OP_STATS = 0x03;
    public const OP_SEND_USER = 0x04;
    public const OP_PRESENCE = 0x05;
    public const OP_PRESENCE_STATS = 0x06;
    public const OP_USER_STATUS = 0x07;
    public const OP_CHANNEL_INFO = 0x08;
    public const OP_CHANNELS = 0x09;
    public const OP_HISTORY = 0x0A;
    public const OP_DISCONNECT = 0x0B;
    public const OP_PING = 0x0C;
    public const OP_PUBLISH_MANY = 0x0D;
    public const OP_RELOAD = 0x0E;
    public const OP_HANDLE = 0x0F;
    public const OP_ANSWER = 0x10;

    public const STATUS_OK = 0;
    public const STATUS_ERROR = 1;
    /** Not a reply: a client's rpc call to a handler connection. */
    public const STATUS_CALL = 2;
    /** Bytes after the length field before the payload. */
    public const HEAD_BYTES = 6;

    public static function u16(int $value, string $what): string
    {
        if ($value < 0 || $value > 0xFFFF) {
            throw new InvalidArgumentException("$what must be 0..65535, got $value");
        }
        return pack('n', $value);
    }

    public static function u32(int $value, string $what): string
    {
        if ($value < 0 || $value > 0xFFFFFFFF) {
            throw new InvalidArgumentException("$what must be 0..4294967295, got $value");
        }
        return pack('N', $value);
    }

    public static function u64(int $value, string $what): string
    {
        if ($value < 0) {
            throw new InvalidArgumentException("$what must not be negative, got $value");
        }
        return pack('J', $value);
    }

    public static function str16(string $text, string $what): string
    {
        if (strlen($text) > 0xFFFF) {
            throw new InvalidArgumentException(sprintf('%s is %d bytes; at most 65535', $what, strlen($text)));
        }
        return pack('n', strlen($text)) . $text;
    }

    /** @param string|string[] $users */
    public static function users($users): string
    {
        $users = is_array($users) ? array_values($users) : [$users];
        if (count($users) > 0xFFFF) {
            throw new InvalidArgumentException('at most 65535 users in one request');
        }
        $out = pack('n', count($users));
        foreach ($users as $user) {
            $out .= self::str16((string) $user, 'user id');
        }
        return $out;
    }

    /** @param mixed $data */
    public static function data($data): string
    {
        if ($data instanceof KometaRawJson) {
            $json = $data->json;
        } else {
            $json = json_encode(
                $data,
                JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR
            );
        }
        return pack('N', strlen($json)) . $json;
    }

    /** @return array{0: string, 1: int} [bytes, new offset] */
    private static function take(string $payload, int $at, int $count, string $what): array
    {
        if ($at + $count > strlen($payload)) {
            throw new KometaConnectionException("admin protocol: reply payload ends inside $what");
        }
        return [(string) substr($payload, $at, $count), $at + $count];
    }

    private static function finish(string $payload, int $at): void
    {
        if ($at !== strlen($payload)) {
            throw new KometaConnectionException(
                sprintf('admin protocol: %d unexpected trailing reply bytes', strlen($payload) - $at)
            );
        }
    }

    public static function emptyReply(string $payload): bool
    {
        self::finish($payload, 0);
        return true;
    }

    public static function published(string $payload): array
    {
        [$head, $at] = self::take($payload, 0, 18, 'offset, subscribers and epoch');
        $fields = unpack('Joffset/Jsubscribers/nlength', $head);
        [$epoch, $at] = self::take($payload, $at, $fields['length'], 'epoch');
        self::finish($payload, $at);
        return ['offset' => $fields['offset'], 'subscribers' => $fields['subscribers'], 'epoch' => $epoch];
    }

    /** @return mixed */
    public static function document(string $payload)
    {
        [$length, $at] = self::take($payload, 0, 4, 'document');
        [$document, $at] = self::take($payload, $at, unpack('N', $length)[1], 'document');
        self::finish($payload, $at);
        try {
            return json_decode($document, true, 512, JSON_BIGINT_AS_STRING | JSON_THROW_ON_ERROR);
        } catch (JsonException $e) {
            throw new KometaConnectionException('admin protocol: reply document is not JSON: ' . $e->getMessage());
        }
    }

    public static function error(string $payload): KometaException
    {
        [$head, $at] = self::take($payload, 0, 4, 'error code');
        $fields = unpack('ncode/nlength', $head);
        [$message, $at] = self::take($payload, $at, $fields['length'], 'error message');
        self::finish($payload, $at);
        return new KometaException($fields['code'], $message);
    }
}

/**
 * A connection to the admin socket. Not shareable between processes (fork):
 * open one per process.
 */
class KometaAdmin
{
    use KometaOperations;

    /** Replies larger than this are refused (a STATS document of hundreds of shards is far below it). */
    public const REPLY_BYTES_MAX = 64 << 20;
    private const CHUNK = 65536;

    /** @var string */
    private $address;
    /** @var string|null */
    private $key;
    /** @var float */
    private $timeout;
    /** @var int */
    private $maxReplyBytes;
    /** @var resource|null */
    private $stream;
    /** @var string */
    private $input = '';
    /** @var int */
    private $nextId = 1;
    /** @var string|null */
    private $caFile = null;

    /**
     * @param string|null $address "unix:/path/admin.sock", "tcp:host:port" or "tls:host:port";
     *                             default: the KOMETA_ADMIN environment variable, else the
     *                             server's default socket
     * @param string|null $key     the admin key, required on a TCP or TLS listener
     * @param float       $timeout seconds for connecting and for every wait on the socket
     * @param string|null $caFile  tls: the CA certificates (PEM) the server's certificate is
     *                             checked against for `host`; default: the KOMETA_ADMIN_CA
     *                             environment variable, else the system's CAs
     */
    public function __construct(?string $address = null, ?string $key = null, float $timeout = 10.0, int $maxReplyBytes = self::REPLY_BYTES_MAX, ?string $caFile = null)
    {
        if ($caFile === null || $caFile === '') {
            $env = getenv('KOMETA_ADMIN_CA');
            $caFile = ($env !== false && $env !== '') ? $env : null;
        }
        $this->caFile = $caFile;
        if ($address === null || $address === '') {
            $env = getenv('KOMETA_ADMIN');
            $address = ($env !== false && $env !== '') ? $env : self::defaultAddress();
        }
        $this->address = $address;
        $this->key = $key;
        $this->timeout = $timeout;
        $this->maxReplyBytes = $maxReplyBytes;
        $this->connect();
    }

    public function __destruct()
    {
        $this->close();
    }

    /** Closes the connection (the next call reconnects). */
    public function close(): void
    {
        if (is_resource($this->stream)) {
            fclose($this->stream);
        }
        $this->stream = null;
        $this->input = '';
    }

    /**
     * Sends every request queued by $queue at once; returns the results in
     * request order, with a KometaException in place of each failed request.
     * Without $queue, returns a KometaPipeline to fill and execute().
     *
     * @return array|KometaPipeline
     */
    public function pipeline(?callable $queue = null)
    {
        $pipeline = new KometaPipeline($this);
        if ($queue === null) {
            return $pipeline;
        }
        $queue($pipeline);
        return $pipeline->execute();
    }

    /**
     * Makes this connection the handler of clients' `rpc` calls whose method
     * starts with one of $prefixes ('' for all; the server needs
     * rpc.admin_handlers = true), then answers calls until the server closes
     * the connection, or until $maxCalls answers: then the connection is
     * closed (calls already routed to it fail with `unavailable`; the next
     * request on this object reconnects). For a long-running PHP worker (CLI).
     *
     * $handler(array $call) gets the call (kind, client, user, claims,
     * transport, method, data) and returns the result, or throws
     * KometaRpcError(message, code); any other exception, or a result that
     * cannot be JSON, answers code 500 with its text. $ready(), if given, is
     * called once registered. Calls are answered one at a time; run several
     * workers to answer in parallel (the server spreads calls over them).
     * Returns the number of calls answered.
     */
    public function serveRpc(array $prefixes, callable $handler, ?int $maxCalls = null, ?callable $ready = null): int
    {
        $payload = KometaWire::u16(count($prefixes), 'prefixes');
        foreach ($prefixes as $prefix) {
            $payload .= KometaWire::str16((string) $prefix, 'prefix');
        }
        $this->submit(KometaWire::OP_HANDLE, $payload, [KometaWire::class, 'emptyReply']);
        if ($ready !== null) {
            $ready();
        }
        $answered = 0;
        try {
            while ($maxCalls === null || $answered < $maxCalls) {
                [$status, $opcode, $id, $payload] = $this->readFrame();
                if ($status === KometaWire::STATUS_CALL) {
                    $call = KometaWire::document($payload);
                    try {
                        try {
                            $answer = ['result' => $handler($call)];
                        } catch (KometaRpcError $e) {
                            $answer = ['error' => ['code' => $e->getCode(), 'message' => $e->getMessage()]];
                        }
                        $body = json_encode($answer, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
                    } catch (Throwable $e) {
                        $error = ['code' => 500, 'message' => get_class($e) . ': ' . $e->getMessage()];
                        $body = (string) json_encode(['error' => $error], JSON_INVALID_UTF8_SUBSTITUTE);
                    }
                    $frame = KometaWire::u32($id, 'call') . pack('N', strlen($body)) . $body;
                    $requestId = $this->nextId;
                    $this->nextId = $this->nextId >= 0xFFFFFFFF ? 1 : $this->nextId + 1;
                    $this->writeReading(pack('NCCN', KometaWire::HEAD_BYTES + strlen($frame), KometaWire::OP_ANSWER, 0, $requestId) . $frame);
                    $answered++;
                } elseif ($status === KometaWire::STATUS_ERROR && $opcode === KometaWire::OP_ANSWER) {
                    $error = KometaWire::error($payload);
                    if ($error->getName() !== 'not_found') { // not_found: the call timed out first
                        throw $error;
                    }
                } elseif ($status !== KometaWire::STATUS_OK) {
                    throw new KometaConnectionException("admin protocol: unexpected frame (status $status, opcode $opcode)");
                }
            }
        } finally {
            // Still registered, with calls possibly on their way: not usable
            // for other requests. The server fails what it routed here.
            $this->close();
        }
        return $answered;
    }

    /** The next frame [status, opcode, id, payload], waiting as long as it takes. */
    private function readFrame(): array
    {
        while (true) {
            if (strlen($this->input) >= 4) {
                $length = unpack('N', $this->input)[1];
                if ($length < KometaWire::HEAD_BYTES || $length > $this->maxReplyBytes) {
                    throw new KometaConnectionException("admin protocol: frame length $length out of range");
                }
                if (strlen($this->input) >= 4 + $length) {
                    $head = unpack('Cstatus/Copcode/Nid', $this->input, 4);
                    $payload = (string) substr($this->input, 4 + KometaWire::HEAD_BYTES, $length - KometaWire::HEAD_BYTES);
                    $this->input = (string) substr($this->input, 4 + $length);
                    return [$head['status'], $head['opcode'], $head['id'], $payload];
                }
            }
            $read = [$this->stream];
            $write = [];
            $except = null;
            if (@stream_select($read, $write, $except, null) === false) {
                continue; // interrupted by a signal
            }
            $this->readAvailable();
        }
    }

    /** Writes $data while taking in what the server sends meanwhile, so neither side blocks. */
    private function writeReading(string $data): void
    {
        $deadline = microtime(true) + $this->timeout;
        while ($data !== '') {
            $wait = $deadline - microtime(true);
            if ($wait <= 0) {
                throw new KometaConnectionException(sprintf('admin socket: no progress for %s s', $this->timeout));
            }
            $read = [$this->stream];
            $write = [$this->stream];
            $except = null;
            $seconds = (int) floor($wait);
            if (@stream_select($read, $write, $except, $seconds, (int) (($wait - $seconds) * 1e6)) === false) {
                continue;
            }
            if ($write) {
                $sent = @fwrite($this->stream, $data);
                if ($sent === false) {
                    throw new KometaConnectionException('admin socket: write failed');
                }
                if ($sent > 0) {
                    $data = (string) substr($data, $sent);
                    $deadline = microtime(true) + $this->timeout;
                }
            }
            if ($read) {
                $this->readAvailable();
            }
        }
    }

    private function readAvailable(): void
    {
        $chunk = @fread($this->stream, self::CHUNK);
        if ($chunk === false || ($chunk === '' && feof($this->stream))) {
            throw new KometaConnectionException('server closed the admin connection');
        }
        $this->input .= $chunk;
    }

    /** @return mixed */
    protected function submit(int $opcode, string $payload, callable $decode)
    {
        $result = $this->runBatch([[$opcode, $payload, $decode]])[0];
        if ($result instanceof KometaException) {
            throw $result;
        }
        return $result;
    }

    /**
     * @internal used by KometaPipeline
     * @param array<int, array{0: int, 1: string, 2: callable}> $requests
     */
    public function runBatch(array $requests): array
    {
        if ($this->stream === null) {
            $this->connect();
        }
        $results = $this->roundTrip($requests);
        foreach ($results as $result) {
            if ($result instanceof KometaException && $result->getCode() === 1) {
                // bad_frame: the server closes the connection after it.
                $this->close();
                break;
            }
        }
        return $results;
    }

    private static function defaultAddress(): string
    {
        $dir = getenv('XDG_RUNTIME_DIR');
        if ($dir === false || $dir === '' || !is_dir($dir)) {
            $dir = sys_get_temp_dir();
        }
        return 'unix:' . rtrim($dir, '/') . '/kometa-admin.sock';
    }

    private function connect(): void
    {
        if (strncmp($this->address, 'unix:', 5) === 0) {
            $path = substr($this->address, 5);
            if ($path === '') {
                throw new InvalidArgumentException('unix: needs a path, for example unix:/run/kometa/admin.sock');
            }
            $remote = 'unix://' . $path;
        } elseif (strncmp($this->address, 'tcp:', 4) === 0 || strncmp($this->address, 'tls:', 4) === 0) {
            $scheme = substr($this->address, 0, 3);
            $hostPort = substr($this->address, 4);
            $colon = strrpos($hostPort, ':');
            if ($colon === false || $colon === 0 || !ctype_digit(substr($hostPort, $colon + 1))) {
                throw new InvalidArgumentException("`{$this->address}`: expected $scheme:HOST:PORT");
            }
            $host = substr($hostPort, 0, $colon);
            if (strpos($host, ':') !== false && $host[0] !== '[') {
                $host = "[$host]";
            }
            $remote = $scheme . '://' . $host . substr($hostPort, $colon);
            if ($scheme === 'tls') {
                $ssl = ['verify_peer' => true, 'verify_peer_name' => true, 'peer_name' => trim($host, '[]')];
                if ($this->caFile !== null) {
                    $ssl['cafile'] = $this->caFile;
                }
                $context = stream_context_create(['ssl' => $ssl]);
            }
        } else {
            throw new InvalidArgumentException("`{$this->address}` must start with unix:, tcp: or tls:");
        }
        $errno = 0;
        $errstr = '';
        $stream = isset($context)
            ? @stream_socket_client($remote, $errno, $errstr, $this->timeout, STREAM_CLIENT_CONNECT, $context)
            : @stream_socket_client($remote, $errno, $errstr, $this->timeout);
        if ($stream === false) {
            if ($errstr === '' && ($error = error_get_last()) !== null) {
                $errstr = $error['message']; // TLS failures leave errstr empty
            }
            throw new KometaConnectionException("cannot connect to {$this->address}: $errstr ($errno)");
        }
        stream_set_blocking($stream, false);
        stream_set_write_buffer($stream, 0);
        $this->stream = $stream;
        $this->input = '';
        if ($this->key !== null) {
            $result = $this->roundTrip([[KometaWire::OP_AUTH, KometaWire::str16($this->key, 'key'), [KometaWire::class, 'emptyReply']]])[0];
            if ($result instanceof KometaException) {
                $this->close();
                throw $result;
            }
        }
    }

    /**
     * Sends every request and reads one reply per request, writing and reading
     * at the same time so that a long pipeline cannot deadlock on full socket
     * buffers.
     */
    private function roundTrip(array $requests): array
    {
        $ids = [];
        $output = '';
        foreach ($requests as [$opcode, $payload]) {
            $id = $this->nextId;
            $this->nextId = $this->nextId >= 0xFFFFFFFF ? 1 : $this->nextId + 1; // 0 is the server's "no request"
            $ids[] = $id;
            $output .= pack('NCCN', KometaWire::HEAD_BYTES + strlen($payload), $opcode, 0, $id) . $payload;
        }
        $results = [];
        $writeError = null;
        try {
            $deadline = microtime(true) + $this->timeout;
            while (count($results) < count($requests)) {
                $wait = $deadline - microtime(true);
                if ($wait <= 0) {
                    throw new KometaConnectionException(
                        sprintf('admin socket: no progress for %s s (%d of %d replies read)', $this->timeout, count($results), count($requests))
                    );
                }
                $read = [$this->stream];
                $write = $output !== '' ? [$this->stream] : [];
                $except = null;
                $seconds = (int) floor($wait);
                $ready = @stream_select($read, $write, $except, $seconds, (int) (($wait - $seconds) * 1e6));
                if ($ready === false) {
                    continue; // interrupted by a signal
                }
                $progress = false;
                if ($write && $output !== '') {
                    $sent = @fwrite($this->stream, $output);
                    if ($sent === false) {
                        // The server may have closed after an error reply
                        // (bad_frame): read what it sent before giving up.
                        $error = error_get_last();
                        $writeError = 'admin socket: write failed' . ($error ? ': ' . $error['message'] : '');
                        $sent = strlen($output);
                    }
                    $output = (string) substr($output, $sent);
                    $progress = $sent > 0;
                }
                if ($read) {
                    $chunk = @fread($this->stream, self::CHUNK);
                    if ($chunk === false || ($chunk === '' && feof($this->stream))) {
                        throw new KometaConnectionException($writeError ?? sprintf(
                            'server closed the admin connection (%d of %d replies read)',
                            count($results),
                            count($requests)
                        ));
                    }
                    if ($chunk !== '') {
                        $this->input .= $chunk;
                        $progress = true;
                        $this->splitReplies($requests, $ids, $results);
                    }
                }
                if ($progress) {
                    $deadline = microtime(true) + $this->timeout;
                }
            }
        } catch (Throwable $e) {
            // Half-sent requests or unread replies: the stream is out of step.
            $this->close();
            throw $e;
        }
        return $results;
    }

    private function splitReplies(array $requests, array $ids, array &$results): void
    {
        $at = 0;
        $have = strlen($this->input);
        while (count($results) < count($requests) && $have - $at >= 4) {
            $length = unpack('N', $this->input, $at)[1];
            if ($length < KometaWire::HEAD_BYTES) {
                throw new KometaConnectionException("admin protocol: reply length $length is shorter than the 6-byte head");
            }
            if ($length > $this->maxReplyBytes) {
                throw new KometaConnectionException(
                    "admin protocol: reply of $length bytes is over the client's limit of {$this->maxReplyBytes}"
                );
            }
            if ($have - $at < 4 + $length) {
                break;
            }
            $head = unpack('Cstatus/Copcode/Nid', $this->input, $at + 4);
            $payload = (string) substr($this->input, $at + 4 + KometaWire::HEAD_BYTES, $length - KometaWire::HEAD_BYTES);
            $at += 4 + $length;
            $index = count($results);
            if ($head['status'] === KometaWire::STATUS_ERROR && $head['id'] === 0) {
                // bad_frame (request id 0): the server closes the connection after it.
                $error = KometaWire::error($payload);
                $results[] = $error;
                while (count($results) < count($requests)) {
                    $results[] = new KometaException($error->getCode(), 'not processed: an earlier request broke the framing');
                }
                break;
            }
            if ($head['id'] !== $ids[$index]) {
                throw new KometaConnectionException("admin protocol: reply for request {$head['id']} while waiting for {$ids[$index]}");
            }
            if ($head['opcode'] !== $requests[$index][0]) {
                throw new KometaConnectionException(
                    "admin protocol: reply opcode {$head['opcode']} for a request with opcode {$requests[$index][0]}"
                );
            }
            if ($head['status'] === KometaWire::STATUS_OK) {
                $results[] = ($requests[$index][2])($payload);
            } elseif ($head['status'] === KometaWire::STATUS_ERROR) {
                $results[] = KometaWire::error($payload);
            } else {
                throw new KometaConnectionException("admin protocol: unknown reply status {$head['status']}");
            }
        }
        $this->input = (string) substr($this->input, $at);
    }
}

/** Queues requests; execute() sends them all at once. Queue methods return the pipeline. */
class KometaPipeline
{
    use KometaOperations;

    /** @var KometaAdmin */
    private $admin;
    /** @var array */
    private $queue = [];

    public function __construct(KometaAdmin $admin)
    {
        $this->admin = $admin;
    }

    /** @return $this */
    protected function submit(int $opcode, string $payload, callable $decode)
    {
        $this->queue[] = [$opcode, $payload, $decode];
        return $this;
    }

    public function count(): int
    {
        return count($this->queue);
    }

    /** Results in request order; a KometaException in place of each failed request. */
    public function execute(): array
    {
        $queue = $this->queue;
        $this->queue = [];
        return $queue ? $this->admin->runBatch($queue) : [];
    }
}
