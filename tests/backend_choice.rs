//! Which backend `Normalizer::new()` picks. Alone in its binary: it sets GPUNORM_BACKEND, which
//! other tests running in parallel threads must not see change.

mod common;

use gpunorm::{wgpu, Normalizer};

/// A software adapter (llvmpipe: device type Cpu) is passed over for the CPU fallback, which says
/// why; GPUNORM_BACKEND forces either backend.
#[test]
fn new_prefers_the_fallback_to_a_software_adapter_and_can_be_forced() {
    let Some(gpu) = common::gpu() else { return };
    let software = gpu.adapter_info().unwrap().device_type == wgpu::DeviceType::Cpu;
    std::env::remove_var("GPUNORM_BACKEND");
    let auto = Normalizer::new().unwrap();
    assert_eq!(auto.is_gpu(), !software, "{}", auto.describe());
    if software {
        assert!(
            auto.describe().contains("software") && auto.describe().contains("GPUNORM_BACKEND=gpu"),
            "{}",
            auto.describe()
        );
    }
    std::env::set_var("GPUNORM_BACKEND", "gpu");
    assert!(Normalizer::new().unwrap().is_gpu());
    std::env::set_var("GPUNORM_BACKEND", "cpu");
    let cpu = Normalizer::new().unwrap();
    assert!(!cpu.is_gpu());
    assert!(!cpu.describe().contains("software"), "{}", cpu.describe());
    std::env::remove_var("GPUNORM_BACKEND");
}
