from stages import paths


def test_root_is_the_nearest_dvc_repository(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "stages").mkdir()
    assert paths.repo_root(tmp_path / "stages") == tmp_path


def test_dvc_experiment_copies_share_the_main_store(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert paths.repo_root(copy) == tmp_path
    assert paths.mlflow_db(copy) == tmp_path / "mlflow.db"
    assert paths.cache_dir(copy) == tmp_path / ".cache" / "mergesweep"
