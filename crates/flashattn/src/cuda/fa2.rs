//! Host side of the FlashAttention-2 forward family (sm80+): variants, launch. TODO(C2)
