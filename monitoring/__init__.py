"""Monitoring: metrics, the health server, alert rules, Slack and Sentry."""
