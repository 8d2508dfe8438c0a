"""A registered secret never reaches a log handler, whatever the logger."""

import logging

from apollo_sync.redact import MASK, redact, register_secret


def test_registered_secret_is_masked_in_every_logger(caplog):
    secret = "sk-test-redact-0123456789"
    register_secret(secret)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("some.library").warning("header was Bearer %s", secret)
        logging.getLogger("apollo_sync.load.session").info(f"key={secret}")
    assert secret not in caplog.text
    assert caplog.text.count(MASK) == 2


def test_short_values_are_not_registered():
    register_secret("ab")
    assert redact("abc ab") == "abc ab"
