rule predict:
    input:
        unpack(lambda w: STUDY.predict_inputs(w.model, w.strategy)),
    output:
        tsv="results/predictions/{model}/{strategy}.tsv",
        json="results/predictions/{model}/{strategy}.json",
    log:
        "logs/predict/{model}/{strategy}.log",
    benchmark:
        "results/benchmarks/predict/{model}/{strategy}.tsv"
    conda:
        "../envs/llm.yaml"
    threads: all_cores()
    resources:
        gpu=1,
    params:
        entry=model_entry,
        settings=lambda w: STUDY.predict_settings(w.model, w.strategy),
    script:
        "../scripts/predict.py"


rule probe:
    input:
        unpack(lambda w: STUDY.probe_inputs(w.model)),
    output:
        tsv="results/predictions/{model}/linear_probe.tsv",
        json="results/predictions/{model}/linear_probe.json",
    log:
        "logs/predict/{model}/linear_probe.log",
    benchmark:
        "results/benchmarks/predict/{model}/linear_probe.tsv"
    conda:
        "../envs/llm.yaml"
    threads: all_cores()
    resources:
        gpu=1,
    params:
        entry=model_entry,
        settings=STUDY.probe_settings(),
    script:
        "../scripts/probe.py"


rule baseline:
    input:
        train="data/processed/train.tsv",
        sample="data/processed/test_sample.tsv",
    output:
        tsv="results/predictions/baseline/baseline_tfidf.tsv",
        json="results/predictions/baseline/baseline_tfidf.json",
    log:
        "logs/predict/baseline/baseline_tfidf.log",
    benchmark:
        "results/benchmarks/predict/baseline/baseline_tfidf.tsv"
    conda:
        "../envs/llm.yaml"
    params:
        seed=config["sample_seed"],
    script:
        "../scripts/baseline.py"
