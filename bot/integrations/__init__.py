"""Chat-platform adapters: Slack (``slack.py``) and Discord (``discord.py``) in front of the Assistant.

Both adapters are thin: a platform event is normalized to a conversation (history from the store
plus the new message), ``Assistant.respond`` streams the reply, and ``common.py`` turns the growing
text into platform messages (split at the size limit without breaking code fences, edited about
once a second, mentions neutralized). Turns, feedback and per-channel settings live in the Store.
The platform SDKs are optional extras (``parley[slack]``, ``parley[discord]``) and are imported
only by the module that needs them.
"""
