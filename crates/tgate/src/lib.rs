//! Stable Diffusion with T-GATE on burn: runs on any burn device (CPU via Flex, native wgpu,
//! browser WebGPU). Loading takes bytes; the filesystem lives in the CLI.

pub mod attention;
pub mod clip;
pub mod deepcache;
pub mod embeddings;
pub mod error;
pub mod host_memory;
pub mod loader;
pub mod nn;
pub mod noise;
pub mod paella_vq_model;
pub mod pipeline;
pub mod pipeline_wuerstchen;
pub mod profile;
pub mod resnet;
pub mod safetensors;
pub mod schedulers;
pub mod stage;
pub mod text_to_image;
pub mod tgate;
pub mod tokenizer;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;
pub mod weights;
pub mod wuerstchen_common;
pub mod wuerstchen_diffnext;
pub mod wuerstchen_prior;

pub use error::{Error, Result};
