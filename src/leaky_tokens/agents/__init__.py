"""The agent API (issue 13): the journey of `spec/e2e-and-security-tests.txt` on the gateway port,
in its envelope, over the auth, token and analytics services."""
