"""Webhooks: endpoints, the delivery outbox, URL safety, Standard Webhooks signing, and the sender.

Events are rows of an outbox written in the transaction of the state change they report
(`outbox.record_event`); a dispatcher thread in each API process claims due rows and sends them.
"""
