"""Speculative decoding: a drafter on the device proposes tokens, the split target model verifies them."""
