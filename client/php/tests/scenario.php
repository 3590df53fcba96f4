<?php
/**
 * Drives every operation of KometaAdmin.php against a running server and
 * prints one JSON document with the results (tests/admin_clients.rs checks it).
 *
 *     php scenario.php unix ADDRESS        # the full scenario
 *     php scenario.php tcp ADDRESS KEY     # a TCP listener with a key
 *     php scenario.php framing ADDRESS     # against the test's fake server
 */

declare(strict_types=1);

require __DIR__ . '/../KometaAdmin.php';

function errorDoc(KometaException $e): array
{
    return ['error' => ['code' => $e->getCode(), 'name' => $e->name, 'message' => $e->getMessage()]];
}

function outcome($result)
{
    return $result instanceof KometaException ? errorDoc($result) : $result;
}

function scenario(string $address): array
{
    $admin = new KometaAdmin($address, null, 10.0);
    $out = ['ping' => $admin->ping()];
    $out['publish'] = $admin->publish(
        'news',
        'greeting',
        ['from' => 'php', 'text' => "h\u{e9}llo \"quoted\"\nline", 'n' => [1, 2.5, null, true]]
    );
    $out['raw'] = $admin->publish('news', 'raw', new KometaRawJson("{\"raw\":\n true}"));
    $out['stats'] = $admin->stats();
    $out['stats_node'] = $admin->stats(true);
    $out['send_user'] = $admin->sendUser(['alice', 'nobody'], 'notice', ['text' => 'hi']);
    $out['presence'] = $admin->presence('track_room');
    $out['presence_page'] = $admin->presence('track_room', '', 1);
    $out['presence_stats'] = $admin->presenceStats('track_room');
    $out['user_status'] = $admin->userStatus(['alice', 'nobody']);
    $out['channel_info'] = $admin->channelInfo('news');
    $out['channel_info_missing'] = $admin->channelInfo('nowhere');
    $out['channels'] = $admin->channels();
    $out['channels_page'] = $admin->channels('', '', 1);
    $out['channels_next'] = $admin->channels('', $out['channels_page']['next'], 1);
    $out['history'] = $admin->history('news');
    $out['history_since'] = $admin->history('news', 1, 10);
    $batch = $admin->pipeline(function (KometaPipeline $p) {
        for ($n = 0; $n < 100; $n++) {
            $p->publish('batch', 'n', ['n' => $n]);
        }
    });
    $out['batch'] = array_map('outcome', $batch);
    $mixed = $admin->pipeline(function (KometaPipeline $p) {
        $p->publish('batch', 'n', 100)->publish('bad channel!', 'n', 1)->ping()->presence('news');
    });
    $out['mixed'] = array_map('outcome', $mixed);
    try {
        $admin->publish('bad channel!', 'e', 1);
        $out['error'] = null;
    } catch (KometaException $e) {
        $out['error'] = errorDoc($e);
    }
    $out['after_error'] = $admin->ping();
    // Data over the server's limit: too_large, the connection stays open.
    try {
        $admin->publish('news', 'big', str_repeat('x', 300000));
        $out['too_large'] = null;
    } catch (KometaException $e) {
        $out['too_large'] = errorDoc($e);
    }
    // A frame over admin_frame_bytes_max: bad_frame, the server closes the
    // connection and the next call reconnects.
    try {
        $admin->publish('news', 'huge', str_repeat('x', 1500000));
        $out['bad_frame'] = null;
    } catch (KometaException $e) {
        $out['bad_frame'] = errorDoc($e);
    }
    $out['after_bad_frame'] = $admin->ping();
    $out['disconnect'] = $admin->disconnect('alice', 4000, 'bye');
    $out['publish_many'] = $admin->publishMany(['many_a', 'many_b'], 'many', ['n' => 1]);
    $out['reload'] = $admin->reload();
    $admin->close();
    return $out;
}

function tcp(string $address, string $key): array
{
    $out = [];
    try {
        new KometaAdmin($address, 'wrong-key-wrong-key-wrong', 10.0);
        $out['wrong_key'] = null;
    } catch (KometaException $e) {
        $out['wrong_key'] = errorDoc($e);
    }
    try {
        (new KometaAdmin($address, null, 10.0))->ping();
        $out['no_key'] = null;
    } catch (KometaException $e) {
        $out['no_key'] = errorDoc($e);
    }
    $admin = new KometaAdmin($address, $key, 10.0);
    $out['publish'] = $admin->publish('news', 'tcp', ['via' => 'tcp', 'from' => 'php']);
    $batch = $admin->pipeline(function (KometaPipeline $p) {
        for ($n = 0; $n < 10; $n++) {
            $p->publish('batch', 'n', $n);
        }
    });
    $out['batch'] = array_map('outcome', $batch);
    $admin->close();
    return $out;
}

/**
 * The fake server answers in 1-byte pieces, pipelined replies in uneven
 * pieces, then a reply with the wrong request id, then (on a new connection)
 * a reply announcing 2 GiB.
 */
function framing(string $address): array
{
    $admin = new KometaAdmin($address, null, 5.0);
    $out = ['short_reads' => $admin->stats()];
    $out['pipelined'] = $admin->pipeline(function (KometaPipeline $p) {
        $p->ping()->ping()->ping();
    });
    foreach (['wrong_id', 'too_big'] as $case) {
        try {
            $admin->ping();
            $out[$case] = null;
        } catch (KometaConnectionException $e) {
            $out[$case] = $e->getMessage();
        }
    }
    return $out;
}

$argv = $_SERVER['argv'];
if (count($argv) >= 3 && $argv[1] === 'unix') {
    $result = scenario($argv[2]);
} elseif (count($argv) >= 4 && $argv[1] === 'tcp') {
    $result = tcp($argv[2], $argv[3]);
} elseif (count($argv) >= 3 && $argv[1] === 'framing') {
    $result = framing($argv[2]);
} else {
    fwrite(STDERR, "usage: php scenario.php unix ADDRESS | tcp ADDRESS KEY | framing ADDRESS\n");
    exit(2);
}
echo json_encode($result, JSON_UNESCAPED_SLASHES | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR), "\n";
