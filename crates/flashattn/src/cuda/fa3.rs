//! Host side of the FlashAttention-3 Hopper forward family (sm90a). TODO(C4)
