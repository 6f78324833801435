"""The JWKS fetcher under the incidents that hurt real systems: a rotation hit by a burst of
requests (one fetch for all), an endpoint that fails once (later requests recover), and keys
rotating while checks are in flight (each decision matches the key-set version it logged)."""

import concurrent.futures
import random
import time

import pytest

from conftest import AUDIENCE, ISSUER, Keys


@pytest.fixture
def jwks_issuer(jwks_server):
    return {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256", "ES256"],
        "jwks_url": jwks_server.url,
        "jwks_min_refetch_ms": 300,
        "jwks_refresh_secs": 3600,
    }


def check(sandgate, token, request_id=None):
    headers = {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/orders"}
    if request_id:
        headers["X-Request-Id"] = request_id
    return sandgate.check(headers)


def test_500_concurrent_requests_with_a_just_rotated_kid_cause_one_fetch(start_sandgate, jwks_server, jwks_issuer, rbac_policy, keys):
    jwks_server.set_keys([keys.jwk(keys.rsa, "rsa-1", "RS256")])
    sandgate = start_sandgate(issuers=[jwks_issuer], policies=[rbac_policy], server={"default_policy": "rbac"})
    assert jwks_server.fetches == 1  # at start
    time.sleep(0.4)  # past the minimum refetch interval
    # The issuer rotates to a new key; tokens signed with it arrive all at once.
    jwks_server.set_keys([keys.jwk(keys.rsa, "rsa-1", "RS256"), keys.jwk(keys.ec, "ec-new", "ES256")])
    jwks_server.delay = 0.2  # a slow issuer: every request arrives while the fetch is in flight
    token = keys.token("ES256", kid="ec-new", roles=["reader"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(lambda _: check(sandgate, token)[0], range(500)))
    assert statuses == [200] * 500
    assert jwks_server.fetches == 2, "exactly one fetch for the rotated kid"


def test_an_endpoint_failing_once_is_not_cached_as_the_answer(start_sandgate, jwks_server, jwks_issuer, rbac_policy, keys):
    jwks_server.set_keys([keys.jwk(keys.rsa, "rsa-1", "RS256")])
    sandgate = start_sandgate(issuers=[jwks_issuer], policies=[rbac_policy], server={"default_policy": "rbac"})
    time.sleep(0.4)
    jwks_server.set_keys([keys.jwk(keys.rsa, "rsa-1", "RS256"), keys.jwk(keys.ec, "ec-2", "ES256")])
    jwks_server.fail_next = 1
    new_token = keys.token("ES256", kid="ec-2", roles=["reader"])
    status, headers, _ = check(sandgate, new_token)
    assert (status, headers["x-sandgate-reason"]) == (401, "unknown_kid")
    # Stale keys keep working meanwhile.
    assert check(sandgate, keys.token("RS256", roles=["reader"]))[0] == 200
    time.sleep(0.4)
    assert check(sandgate, new_token)[0] == 200, "a later request fetches again and succeeds"
    assert jwks_server.fetches == 3


def test_random_kids_cannot_make_sandgate_hammer_the_issuer(start_sandgate, jwks_server, jwks_issuer, rbac_policy, keys):
    jwks_server.set_keys([keys.jwk(keys.rsa, "rsa-1", "RS256")])
    sandgate = start_sandgate(issuers=[jwks_issuer], policies=[rbac_policy], server={"default_policy": "rbac"})
    started = time.time()
    for i in range(200):
        assert check(sandgate, keys.token("RS256", kid=f"random-{i}", roles=["reader"]))[0] == 401
    elapsed = time.time() - started
    # at most one fetch per 300 ms interval (plus the one at start)
    assert jwks_server.fetches <= 2 + int(elapsed / 0.3)


def test_keys_rotating_during_checks_each_decision_matches_its_logged_key_set(start_sandgate, jwks_server, jwks_issuer, rbac_policy, keys):
    other = Keys()
    key_a = keys.jwk(keys.rsa, "key-a", "RS256")
    key_b = keys.jwk(other.rsa, "key-b", "RS256")
    jwks_server.set_keys([key_a])
    jwks_issuer["jwks_min_refetch_ms"] = 20
    sandgate = start_sandgate(issuers=[jwks_issuer], policies=[rbac_policy], server={"default_policy": "rbac"})
    token_a = keys.token("RS256", kid="key-a", roles=["reader"])
    token_b = other.token("RS256", kid="key-b", roles=["reader"])
    stop = time.time() + 3
    sent = {}

    def client(n):
        i = 0
        while time.time() < stop:
            which = random.choice("ab")
            request_id = f"c{n}-{i}-{which}"
            sent[request_id] = check(sandgate, token_a if which == "a" else token_b, request_id)[0]
            i += 1

    def rotate():
        sets = [[key_a], [key_b], [key_a, key_b]]
        i = 0
        while time.time() < stop:
            jwks_server.set_keys(sets[i % 3])
            # trigger a refresh by asking for a kid that does not exist
            check(sandgate, keys.token("RS256", kid=f"nudge-{i}", roles=["reader"]))
            i += 1
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(max_workers=17) as pool:
        futures = [pool.submit(client, n) for n in range(16)] + [pool.submit(rotate)]
        for f in futures:
            f.result()

    # Key-set version 1 is the (empty) static set; the n-th successful fetch published n + 1.
    kids_at = {1: []}
    for n, kids in enumerate(jwks_server.served, start=1):
        kids_at[n + 1] = kids
    log = {line["client_request_id"]: line for line in sandgate.decision_log() if line.get("client_request_id")}
    checked = 0
    for request_id, status in sent.items():
        line = log[request_id]
        kid = "key-a" if request_id.endswith("a") else "key-b"
        present = kid in kids_at[line["key_set"]]
        assert (status == 200) == present, f"{request_id}: status {status} with key set {line['key_set']} = {kids_at[line['key_set']]}"
        checked += 1
    assert checked > 200
    assert len(jwks_server.served) > 5, "keys really rotated during the test"
