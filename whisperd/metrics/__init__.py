"""Metrics: the Prometheus registry and the /metrics server.

`registry.Metrics` holds the families and turns typed events into samples;
`state` is the collector read at scrape time; `server` serves /metrics with
bounded connection threads (`bounded_http`). May import: devices, events,
jobs, logs. Never the store: the daemon hands it views.
"""
