"""The agent's local API for apps in any language: HTTP on a Unix socket (and loopback
TCP), tokens per app, a resumable change feed (`agent.http.server.ApiServer`)."""
