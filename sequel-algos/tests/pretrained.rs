//! `model.init_from` / `model.init_head` / `model.freeze`: weights load exactly (sequel-rs files,
//! checkpoints, torchvision-named ResNet-18s), mismatches are one clear error before anything is
//! written, and frozen layers do not move while training — batch-norm statistics included.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::config::ModelConfig;
use sequel_core::model::pretrained::resnet18_name;
use sequel_core::model::{Model, Role};
use sequel_core::sources::{BackboneSpec, Sources};
use sequel_core::trainer::Silent;

fn model(yaml: &str, seed: u64, heads: &[usize]) -> sequel_core::Result<Box<dyn Model>> {
    let cfg: ModelConfig = serde_yaml::from_str(yaml).unwrap();
    let input = if cfg.kind.name() == "resnet18" {
        [3, 8, 8]
    } else {
        [1, 28, 28]
    };
    let spec = BackboneSpec {
        input,
        heads,
        tasks: heads.len(),
        seed,
        device: &Device::Cpu,
    };
    Sources::builtin().build_model(&cfg, &spec, "t.yaml")
}

fn values(m: &dyn Model) -> HashMap<String, Vec<u32>> {
    m.params()
        .iter()
        .map(|p| {
            let v: Vec<f32> = p.var.flatten_all().unwrap().to_vec1().unwrap();
            (p.name.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn is_head(name: &str) -> bool {
    name.starts_with("head")
}

fn save(m: &dyn Model, path: &Path, rename: impl Fn(&str) -> String) {
    let named: HashMap<String, Tensor> = m
        .params()
        .to_named()
        .into_iter()
        .map(|(k, t)| (rename(&k), t))
        .collect();
    candle_core::safetensors::save(&named, path).unwrap();
}

#[test]
fn a_saved_model_loads_bit_for_bit_with_or_without_its_head() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("w.safetensors");
    let trained = model("{kind: mlp, hidden: [16]}", 1, &[10]).unwrap();
    save(trained.as_ref(), &file, str::to_string);
    let f = file.display();

    let loaded = model(
        &format!("{{kind: mlp, hidden: [16], init_from: '{f}', init_head: load}}"),
        2,
        &[10],
    )
    .unwrap();
    assert_eq!(values(loaded.as_ref()), values(trained.as_ref()));
    // Identical weights evaluate identically.
    let x = Tensor::ones((3, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let logits = |m: &dyn Model| -> Vec<Vec<f32>> {
        m.forward(&x, false).unwrap().logits.to_vec2().unwrap()
    };
    assert_eq!(logits(loaded.as_ref()), logits(trained.as_ref()));

    // `init_head: fresh` (the default): the body from the file, the head as seeded — even for
    // another number of classes.
    let fresh = model(
        &format!("{{kind: mlp, hidden: [16], init_from: '{f}'}}"),
        2,
        &[4],
    )
    .unwrap();
    let seeded = model("{kind: mlp, hidden: [16]}", 2, &[4]).unwrap();
    let (got, file_v, seed_v) = (
        values(fresh.as_ref()),
        values(trained.as_ref()),
        values(seeded.as_ref()),
    );
    for (name, v) in &got {
        let want = if is_head(name) { &seed_v } else { &file_v };
        assert_eq!(v, &want[name], "{name}");
    }
    assert_ne!(got["fc1.weight"], seed_v["fc1.weight"]);
}

#[test]
fn a_checkpoint_state_file_loads_its_model_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("state-2.safetensors");
    let m = model("{kind: mlp, hidden: [8]}", 3, &[10]).unwrap();
    let mut named: HashMap<String, Tensor> = m
        .params()
        .to_named()
        .into_iter()
        .map(|(k, t)| (format!("model.{k}"), t))
        .collect();
    named.insert(
        "optimizer.momentum.0".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&named, &file).unwrap();
    let loaded = model(
        &format!(
            "{{kind: mlp, hidden: [8], init_from: '{}', init_head: load}}",
            file.display()
        ),
        0,
        &[10],
    )
    .unwrap();
    assert_eq!(values(loaded.as_ref()), values(m.as_ref()));
}

#[test]
fn a_torchvision_named_resnet18_loads_into_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("resnet18.safetensors");
    let ours = model("{kind: resnet18, width: 2}", 5, &[10]).unwrap();
    // torchvision's names for our tensors, plus what torchvision saves and we do not use.
    let theirs = |name: &str| -> String {
        name.replace("stem.conv.", "conv1.")
            .replace("stem.bn.", "bn1.")
            .replace(".shortcut.conv.", ".downsample.0.")
            .replace(".shortcut.bn.", ".downsample.1.")
            .replacen("head.", "fc.", 1)
    };
    let mut named: HashMap<String, Tensor> = ours
        .params()
        .to_named()
        .into_iter()
        .map(|(k, t)| (theirs(&k), t))
        .collect();
    assert!(named.contains_key("layer2.0.downsample.1.running_var"));
    named.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::zeros((), DType::I64, &Device::Cpu).unwrap(),
    );
    // A head for 1000 classes: skipped with the default `init_head: fresh`.
    named.insert(
        "fc.weight".into(),
        Tensor::zeros((1000, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    named.insert(
        "fc.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    for k in named.keys() {
        let mapped = resnet18_name(k);
        assert!(
            k.ends_with("num_batches_tracked") || ours.params().iter().any(|p| p.name == mapped),
            "{k} → {mapped}"
        );
    }
    candle_core::safetensors::save(&named, &file).unwrap();
    let loaded = model(
        &format!(
            "{{kind: resnet18, width: 2, init_from: '{}'}}",
            file.display()
        ),
        6,
        &[10],
    )
    .unwrap();
    let (got, want) = (values(loaded.as_ref()), values(ours.as_ref()));
    for p in loaded.params().iter().filter(|p| p.role != Role::Head) {
        assert_eq!(got[&p.name], want[&p.name], "{}", p.name);
    }
}

#[test]
fn mismatches_are_one_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("w.safetensors");
    let f = file.display().to_string();
    save(
        model("{kind: mlp, hidden: [16]}", 1, &[10])
            .unwrap()
            .as_ref(),
        &file,
        str::to_string,
    );
    let err = |yaml: &str, heads: &[usize]| model(yaml, 0, heads).err().unwrap().to_string();

    let e = err(
        &format!("{{kind: mlp, hidden: [32], init_from: '{f}'}}"),
        &[10],
    );
    assert!(
        e.starts_with("t.yaml: model.init_from:") && e.contains("`fc1.weight` has shape [16, 784]"),
        "{e}"
    );
    let e = err(
        &format!("{{kind: mlp, hidden: [16, 16], init_from: '{f}'}}"),
        &[10],
    );
    assert!(e.contains("no tensor `fc2.weight`"), "{e}");
    let e = err(
        &format!("{{kind: mlp, hidden: [16], init_from: '{f}', init_head: load}}"),
        &[4],
    );
    assert!(
        e.contains("`head.weight` has shape [10, 16]") && e.contains("init_head: fresh"),
        "{e}"
    );
    let e = err(&format!("{{kind: cnn, init_from: '{f}'}}"), &[10]);
    assert!(e.contains("model.init_from"), "{e}");
    let e = err("{kind: mlp, init_from: no/such/file.safetensors}", &[10]);
    assert!(
        e.contains("`no/such/file.safetensors` is not a file"),
        "{e}"
    );
    std::fs::write(tmp.path().join("junk"), b"not safetensors").unwrap();
    let e = err(
        &format!(
            "{{kind: mlp, init_from: '{}'}}",
            tmp.path().join("junk").display()
        ),
        &[10],
    );
    assert!(e.contains("is not a safetensors file"), "{e}");
    // A file with tensors the model does not have is refused, not half-loaded.
    let mut named = model("{kind: mlp, hidden: [16]}", 1, &[10])
        .unwrap()
        .params()
        .to_named();
    named.insert(
        "fc9.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&named, &file).unwrap();
    let e = err(
        &format!("{{kind: mlp, hidden: [16], init_from: '{f}'}}"),
        &[10],
    );
    assert!(e.contains("`fc9.weight`"), "{e}");

    let e = err("{kind: mlp, freeze: [layer1]}", &[10]);
    assert!(
        e.starts_with("t.yaml: model.freeze:") && e.contains("its layers are fc1, fc2, head"),
        "{e}"
    );
}

fn run_config(out: &Path, model: &str) -> String {
    format!(
        "name: frozen\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 2, scenario: class-il, train_subset: 40 }}\n\
         model: {model}\n\
         optimizer: {{ kind: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.001 }}\n\
         training: {{ epochs: 1, batch_size: 10 }}\n\
         output: {{ dir: {} }}\n",
        out.display()
    )
}

#[test]
fn frozen_layers_do_not_move_while_the_others_train() {
    for (yaml, frozen) in [
        ("{kind: mlp, hidden: [16, 16], freeze: [fc1]}", vec!["fc1."]),
        (
            "{kind: resnet18, width: 2, freeze: [stem, layer1]}",
            vec!["stem.", "layer1."],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let text = run_config(tmp.path(), yaml);
        let p = prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
        let mut t = p.trainer().unwrap();
        let before = values(t.model.as_ref());
        let out = t.run(&mut Silent).unwrap();
        assert!(out.failure.is_none(), "{yaml}: {:?}", out.failure);
        let after = values(t.model.as_ref());
        let mut moved = 0;
        for (name, v) in &after {
            if frozen.iter().any(|f| name.starts_with(f)) {
                assert_eq!(v, &before[name], "{yaml}: frozen `{name}` moved");
            } else if v != &before[name] {
                moved += 1;
            }
        }
        assert!(moved > 2, "{yaml}: the rest trains ({moved} tensors moved)");
        // The same run without freezing moves the would-be-frozen tensors too.
        let free = yaml
            .replace(", freeze: [fc1]", "")
            .replace(", freeze: [stem, layer1]", "");
        let text = run_config(tmp.path(), &free);
        let mut t = prepare(&text, "t.yaml", &[], &Registry::builtin())
            .unwrap()
            .trainer()
            .unwrap();
        t.run(&mut Silent).unwrap();
        let unfrozen = values(t.model.as_ref());
        let first = before.keys().find(|n| n.starts_with(frozen[0])).unwrap();
        assert_ne!(unfrozen[first], before[first], "{free}");
    }
}

#[test]
fn a_bad_freeze_or_init_from_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for model in [
        "{kind: mlp, freeze: [fc7]}",
        "{kind: mlp, init_from: missing.safetensors}",
    ] {
        let text = run_config(tmp.path(), model);
        let p = prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
        let e = execute(p, &mut Silent, None).err().unwrap().to_string();
        assert!(e.starts_with("t.yaml: model."), "{e}");
        assert!(
            !tmp.path().join("frozen").exists(),
            "{model}: a run folder was created"
        );
    }
}

/// `model.lipschitz_bn` with a file of plain batch norms (here torchvision-named) is refused in
/// one line naming the option and the fix, before a run folder exists; the other way round
/// too. A sequel-rs file trained with the option loads into it bit for bit.
#[test]
fn lipschitz_norms_load_only_from_lipschitz_files() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.safetensors");
    let torchvision = |name: &str| -> String {
        name.replace("stem.conv.", "conv1.")
            .replace("stem.bn.", "bn1.")
            .replace(".shortcut.conv.", ".downsample.0.")
            .replace(".shortcut.bn.", ".downsample.1.")
            .replacen("head.", "fc.", 1)
    };
    let ours = model("{kind: resnet18, width: 2}", 5, &[10]).unwrap();
    save(ours.as_ref(), &plain, torchvision);
    let yaml = format!(
        "{{kind: resnet18, width: 2, lipschitz_bn: true, init_from: '{}'}}",
        plain.display()
    );
    let e = model(&yaml, 0, &[10]).err().unwrap().to_string();
    assert!(e.starts_with("t.yaml: model.lipschitz_bn:"), "{e}");
    // The file's names are shown mapped to ours (`bn1.weight` is `stem.bn.weight`).
    assert!(
        e.contains("`stem.bn.weight` in place of `stem.bn.log_gamma`"),
        "{e}"
    );
    assert!(e.contains("leave out `model.lipschitz_bn`"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");

    let lip = tmp.path().join("lipschitz.safetensors");
    let trained = model("{kind: resnet18, width: 2, lipschitz_bn: true}", 7, &[10]).unwrap();
    let log_gamma = trained
        .params()
        .iter()
        .find(|p| p.name == "layer2.0.bn1.log_gamma")
        .unwrap()
        .var
        .clone();
    log_gamma
        .set(&Tensor::new(&[0.25f32], &Device::Cpu).unwrap())
        .unwrap();
    save(trained.as_ref(), &lip, str::to_string);
    let yaml = format!(
        "{{kind: resnet18, width: 2, lipschitz_bn: true, init_from: '{}', init_head: load}}",
        lip.display()
    );
    let loaded = model(&yaml, 0, &[10]).unwrap();
    assert_eq!(values(loaded.as_ref()), values(trained.as_ref()));
    let yaml = format!(
        "{{kind: resnet18, width: 2, init_from: '{}'}}",
        lip.display()
    );
    let e = model(&yaml, 0, &[10]).err().unwrap().to_string();
    assert!(
        e.starts_with("t.yaml: model.lipschitz_bn:")
            && e.contains("set `model.lipschitz_bn: true`"),
        "{e}"
    );

    // Through a whole run: refused before the run folder is created.
    let text = run_config(
        tmp.path(),
        &format!(
            "{{kind: resnet18, width: 2, lipschitz_bn: true, init_from: '{}'}}",
            plain.display()
        ),
    );
    let p = prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
    let e = execute(p, &mut Silent, None).err().unwrap().to_string();
    assert!(e.starts_with("t.yaml: model.lipschitz_bn:"), "{e}");
    assert!(!tmp.path().join("frozen").exists());
}

/// A network without DWA (here a torchvision-named ResNet-18) loads into a DWA model, whose α
/// stay at the identity: it computes the file's network bit for bit. A DWA file loads its α.
#[test]
fn a_plain_file_loads_into_a_dwa_model_at_the_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.safetensors");
    let theirs = |name: &str| -> String {
        name.replace("stem.conv.", "conv1.")
            .replace("stem.bn.", "bn1.")
            .replace(".shortcut.conv.", ".downsample.0.")
            .replace(".shortcut.bn.", ".downsample.1.")
            .replacen("head.", "fc.", 1)
    };
    let trained = model("{kind: resnet18, width: 2}", 5, &[10]).unwrap();
    save(trained.as_ref(), &plain, theirs);
    let yaml = |dwa: &str, f: &Path| {
        format!(
            "{{kind: resnet18, width: 2, {dwa}init_from: '{}', init_head: load}}",
            f.display()
        )
    };
    let plain_loaded = model(&yaml("", &plain), 0, &[10]).unwrap();
    let with = model(&yaml("dwa: {}, ", &plain), 0, &[10]).unwrap();
    let (got, want) = (values(with.as_ref()), values(trained.as_ref()));
    for p in with.params().iter() {
        if p.name.starts_with("dwa") {
            let a: Vec<f32> = p.var.to_vec1().unwrap();
            assert_eq!(a.last(), Some(&1.0), "{}", p.name);
            assert!(a[..a.len() - 1].iter().all(|&x| x == 0.0), "{}", p.name);
        } else {
            assert_eq!(got[&p.name], want[&p.name], "{}", p.name);
        }
    }
    let mut rng = sequel_core::rng::SeededRng::new(1, sequel_core::rng::Stream::Init);
    let v: Vec<f32> = (0..2 * 3 * 8 * 8).map(|_| rng.normal()).collect();
    let x = Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let logits = |m: &dyn Model| -> Vec<u32> {
        let l = m.forward(&x, false).unwrap().logits.flatten_all().unwrap();
        l.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(logits(with.as_ref()), logits(plain_loaded.as_ref()));

    // A DWA file: its α load (moved ones included); a plain model refuses it.
    let dwa_file = tmp.path().join("dwa.safetensors");
    let dwa = model("{kind: resnet18, width: 2, dwa: {}}", 3, &[10]).unwrap();
    let alpha = dwa
        .params()
        .iter()
        .find(|p| p.name == "dwa2.alpha")
        .unwrap();
    alpha
        .var
        .set(&Tensor::new(&[0.5f32, -0.25, 1.5], &Device::Cpu).unwrap())
        .unwrap();
    save(dwa.as_ref(), &dwa_file, str::to_string);
    let loaded = model(&yaml("dwa: {}, ", &dwa_file), 0, &[10]).unwrap();
    assert_eq!(values(loaded.as_ref()), values(dwa.as_ref()));
    let e = model(&yaml("", &dwa_file), 0, &[10])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`dwa"), "{e}");
}

#[test]
fn file_sha256_is_the_standard_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("abc");
    std::fs::write(&p, b"abc").unwrap();
    // FIPS 180-2, appendix B.1.
    assert_eq!(
        sequel_core::model::pretrained::file_sha256(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// summary.json names the `init_from` file by its digest; a resume refuses a different file
/// under the same path, and without the file resumes from the checkpoint's weights, writing the
/// uninterrupted run's results and the original digest.
#[test]
fn init_from_is_recorded_by_its_sha256_and_a_resume_refuses_another_file() {
    use sequel_algos::run::execute_with;
    use sequel_core::experiment::{ResumeFrom, RunOptions};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("init.safetensors");
    let other = tmp.path().join("other.safetensors");
    save(
        model("{kind: mlp, hidden: [16]}", 5, &[10])
            .unwrap()
            .as_ref(),
        &file,
        str::to_string,
    );
    save(
        model("{kind: mlp, hidden: [16]}", 6, &[10])
            .unwrap()
            .as_ref(),
        &other,
        str::to_string,
    );
    let text = run_config(
        tmp.path(),
        &format!("{{kind: mlp, hidden: [16], init_from: {}}}", file.display()),
    )
    .replace("tasks: 2", "tasks: 5");
    let run = |opts: &RunOptions| {
        let p = prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
        execute_with(p, &mut Silent, None, opts)
    };
    let full = run(&RunOptions::default()).unwrap().dir;
    // JSON is YAML.
    let summary: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    let sha = sequel_core::model::pretrained::file_sha256(&file).unwrap();
    assert_eq!(summary["protocol"]["init_from"]["sha256"], sha.as_str());
    assert_ne!(
        sha,
        sequel_core::model::pretrained::file_sha256(&other).unwrap()
    );
    let matrix = std::fs::read(full.join("accuracy_matrix.csv")).unwrap();
    std::fs::remove_dir_all(&full).unwrap();
    let stop = RunOptions {
        stop_after_task: Some(1),
        ..RunOptions::default()
    };
    assert!(run(&stop).is_err());
    let resume = RunOptions {
        resume: Some(ResumeFrom {
            dir: tmp.path().join("frozen/.seed-0.partial"),
            task: None,
        }),
        ..RunOptions::default()
    };
    std::fs::copy(&other, &file).unwrap();
    let e = run(&resume).err().unwrap().to_string();
    assert!(e.contains("model.init_from: the file differs"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    std::fs::remove_file(&file).unwrap();
    let resumed = run(&resume).unwrap().dir;
    assert_eq!(
        std::fs::read(resumed.join("accuracy_matrix.csv")).unwrap(),
        matrix
    );
    let summary: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(resumed.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["protocol"]["init_from"]["sha256"], sha.as_str());
    // A fresh run still needs the file.
    std::fs::remove_dir_all(&resumed).unwrap();
    let e = run(&RunOptions::default()).err().unwrap().to_string();
    assert!(e.contains("model.init_from"), "{e}");
}
