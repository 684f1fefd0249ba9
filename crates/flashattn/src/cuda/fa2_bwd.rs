//! Host side of the FlashAttention-2 backward family (sm80+). TODO(C3)
