from tests.conftest import assert_invariant


def test_chat_completion_with_demo_provider_charges_and_returns_usage(client, tenant, app):
    response = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "Hello there"}]},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.json
    body = response.json
    assert body["choices"][0]["message"]["content"].startswith("[demo provider")
    assert body["usage"]["cost_credits"] > 0
    assert response.headers["X-Credits-Charged"]
    assert_invariant(app)
