"""Split inference: stage hosts with sessions, the device-side pipeline over hops, and the generation loop.

Transport-agnostic: a hop is anything with `forward(ForwardRequest) -> ForwardReply` and `close(CloseSession)`.
"""
