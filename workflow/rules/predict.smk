rule predict:
    input:
        unpack(predict_inputs),
    output:
        tsv="results/predictions/{model}/{strategy}.tsv",
        json="results/predictions/{model}/{strategy}.json",
    params:
        location=model_location,
        entry=model_params,
        settings=predict_settings,
    log:
        "logs/predict/{model}/{strategy}.log",
    benchmark:
        "results/benchmarks/predict/{model}/{strategy}.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/llm.yaml"
    script:
        "../scripts/predict.py"


rule baseline:
    input:
        train="data/processed/train.tsv",
        sample="data/processed/test_sample.tsv",
    output:
        tsv="results/predictions/baseline/baseline_tfidf.tsv",
        json="results/predictions/baseline/baseline_tfidf.json",
    params:
        seed=config["sample_seed"],
    log:
        "logs/predict/baseline/baseline_tfidf.log",
    benchmark:
        "results/benchmarks/predict/baseline/baseline_tfidf.tsv"
    conda:
        "../envs/llm.yaml"
    script:
        "../scripts/baseline.py"
