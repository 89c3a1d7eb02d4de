"""How a parameter is held on this rank (plain tensor, FSDP2/HSDP DTensor block, DeepSpeed
ZeRO piece, replica with a per-rank gradient) and the collectives that join its pieces.
Nothing here steps an optimizer: that is galore_ds/optim."""
