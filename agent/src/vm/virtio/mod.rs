//! virtio devices: the virtio-mmio transport and a virtio-blk disk over rust-vmm's
//! `virtio-queue`.

pub mod blk;
pub mod mmio;

#[cfg(test)]
mod tests;
