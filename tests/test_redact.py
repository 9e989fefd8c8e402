from osp_megatron.config.redact import redact_secrets, redact_tree


def test_uri_password_and_token_masked():
    assert redact_secrets("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_secrets("https://ghp_abc123@host/") == "https://***@host/"
    assert redact_secrets("http://h/?token=abc&run=1") == "http://h/?token=***&run=1"
    assert redact_secrets("http://h/?X-Amz-Signature=ff&a=b") == "http://h/?X-Amz-Signature=***&a=b"


def test_plain_values_unchanged():
    for s in ["", "sqlite:///run/mlflow.db", "http://host:5000", "runs/demo", "file:///a/b"]:
        assert redact_secrets(s) == s


def test_tree():
    t = {"tracking": {"uri": "http://u:p@h"}, "l": ["http://u:p@h", 3]}
    assert redact_tree(t) == {"tracking": {"uri": "http://u:***@h"}, "l": ["http://u:***@h", 3]}
