"""Pure decisions: no ray, no vllm imports (tests/unit/test_policy_purity.py enforces it)."""
